"""One model chunk of a pipeline stage as the module torch.distributed.pipelining runs: embedding (first stage),
a contiguous range of global layers, final norm + LM head + per-token loss (last stage); MoE aux losses reach the
backward through the chunk's output (Megatron-LM's MoEAuxLossAutoScaler)."""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.context_parallel import gather_sequence, local_indices
from megatron.model.transformer import run_layers


class AuxLossToOutput(torch.autograd.Function):
    """y = x; in the backward the aux loss gets the gradient `holder.aux_grad_scale` (Megatron-LM's
    MoEAuxLossAutoScaler). A pipeline stage returns one tensor, its activation, and the schedule back-propagates
    from the last stage's loss only: attaching each stage's weighted aux loss (coeff · Σ aux + z_coeff · Σ z) to
    that activation gives it the same gradient as adding it to the loss, d total / d aux = the scale the loss is
    multiplied by (loss scale / micro-batches), with no extra pipeline output."""

    @staticmethod
    def forward(ctx, x, aux, holder):
        ctx.holder = holder
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.holder.aux_grad_scale), None


class GPTChunk(torch.nn.Module):
    """Global layers `layer_ids` of a stage GPTModel (megatron/model/gpt_model.py, built with layer_ids /
    pre_process / post_process), with the embedding when `first` and the head when `last`.

    forward(x, labels): x is tokens [b, s] (int64) on the first chunk, else the previous chunk's activation
    [b, s', h]; returns the activation [b, s', h] (fp32, the residual stream's dtype), or on the last chunk the
    per-token cross entropy [b, s] (fp32) of the whole sequence. `labels` [b, s] reach every chunk as a keyword
    (the schedule passes keywords to all stages); the last reads them, every chunk takes the sequence length and
    positions from them. Each call appends its MoE stats (detached) to `stats`.

    s' is the sequence this rank's layers hold, as without PP (megatron/model/gpt_model.py): with
    --context-parallel-size N this CP rank's load-balanced chunks (s/N tokens at their global positions; the last
    chunk all-gathers the per-token loss back to [b, s], its backward taking this rank's part), and with
    --sequence-parallel this TP rank's 1/tp of those (the embedding scatters, the head all-gathers).
    """

    def __init__(self, model, layer_ids, first: bool, last: bool, moe_cfg=None, autocast=None):
        super().__init__()
        self.autocast = autocast or contextlib.nullcontext  # --bf16/--fp16: the non-pipeline step's autocast
        object.__setattr__(self, "gpt", model)  # not a submodule: the stage model owns (and names) the parameters
        held = dict(zip(model.layers.global_ids, model.layers))
        self.layers = torch.nn.ModuleList(held[i] for i in layer_ids)
        self.first, self.last = first, last
        self.aux_coeff = moe_cfg.loss_coeff if moe_cfg is not None else 0.0
        self.z_coeff = (moe_cfg.z_loss_coeff or 0.0) if moe_cfg is not None else 0.0
        self.aux_grad_scale = 1.0  # set per step: the factor the loss is multiplied by before the backward
        self.stats: List[list] = []  # per call: [MoEStats of each MoE layer of this chunk]

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        gpt = self.gpt
        if self.training != gpt.training:  # model.train()/eval() reach the stage model, which this chunk follows
            self.train(gpt.training)
        with self.autocast():
            return self._forward(gpt, x, labels)

    def _forward(self, gpt, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        b, s = (labels if labels is not None else x).shape[:2]  # the whole sequence, whatever x holds of it
        position_ids = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        idx = None
        if gpt.cp_group is not None:  # this CP rank's chunks, at their global positions
            idx = local_indices(s, dist.get_rank(gpt.cp_group), dist.get_world_size(gpt.cp_group), x.device)
            position_ids = position_ids[:, idx]
        if self.first:
            x = gpt.embed(x[:, idx] if idx is not None else x, position_ids)  # (SP: scattered along the sequence)
        rotary = gpt.rotary(position_ids) if gpt.rotary is not None else None
        x, stats = run_layers(self.layers, x, rotary, None, gpt.cfg, gpt.rng_tracker)
        if stats:
            self.stats.append([st._replace(aux_loss=st.aux_loss.detach(), z_loss=torch.as_tensor(st.z_loss).detach())
                               for st in stats])
            if torch.is_grad_enabled() and self.training:
                aux = self.aux_coeff * sum(st.aux_loss for st in stats)
                if self.z_coeff:
                    aux = aux + self.z_coeff * sum(st.z_loss for st in stats)
                x = AuxLossToOutput.apply(x, aux, self)
        if self.last:
            loss = gpt.head(x, labels[:, idx] if idx is not None else labels, return_logits=False,
                            parallel_output=True).loss
            # every CP rank computes the loss of the whole sequence: its gradient is complete, no reduction
            return gather_sequence(loss, 1, gpt.cp_group, reduce_grad=False) if idx is not None else loss
        return x
