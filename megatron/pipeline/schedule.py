"""Pipeline-parallel forward/backward of one iteration and the validation forward, on torch.distributed.pipelining
(PipelineStage per model chunk; ScheduleGPipe, Schedule1F1B or ScheduleInterleaved1F1B), plus what Megatron-LM's
finalize_model_grads adds around it: the tied embedding's gradient summed over the embedding group, and the loss
and MoE statistics of every stage brought to every rank of the pipeline."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from megatron.pipeline.stage import GPTChunk

SCHEDULES = ("1f1b", "gpipe")  # --pipeline-schedule; virtual stages always run interleaved 1F1B


def local_seq_length(model, seq_length: int, groups) -> int:
    """The sequence length of the activation a stage of `model` sends: the whole sequence, / CP (this CP rank's
    load-balanced chunks), / TP with --sequence-parallel (this TP rank's part of them)."""
    if model.cp_group is not None:
        seq_length //= dist.get_world_size(model.cp_group)
    if model.sequence_parallel:
        seq_length //= groups.tp_size
    return seq_length


class Pipeline:
    """This rank's chunks of the pipeline and the schedules that run them (one per micro-batch count, built on
    first use: the count changes under --rampup-batch-size).

    Args:
        model: the stage GPTModel (parameters of every chunk of this rank, global names).
        chunks: [virtual rank] -> global layer ids of each chunk of this rank (megatron.pipeline.layout).
        groups: ParallelGroups (pp_group, embedding_group, dp_group used here).
        moe_cfg: MoEConfig or None (aux/z loss coefficients).
        micro_batch_size, seq_length, hidden_size: the micro-batch [b, s] and the hidden size; the activation sent
            between stages is [b, s', h] with s' = s / CP (this CP rank's chunks) / TP under --sequence-parallel.
        schedule: "1f1b" or "gpipe" (one chunk per rank); several chunks always use interleaved 1F1B.
        autocast: a context-manager factory every chunk's forward runs in (--bf16/--fp16 autocast; None: none).
    """

    def __init__(self, model, chunks: Sequence[Sequence[int]], groups, device, moe_cfg, micro_batch_size: int,
                 seq_length: int, hidden_size: int, schedule: str = "1f1b", autocast=None):
        self.model, self.groups, self.device, self.schedule_name = model, groups, device, schedule
        self.pp_size, self.pp_rank = groups.pp_size, groups.pp_rank
        n_stages = self.pp_size * len(chunks)
        self.stage_ids = [v * self.pp_size + self.pp_rank for v in range(len(chunks))]
        self.chunks = [GPTChunk(model, ids, first=s == 0, last=s == n_stages - 1, moe_cfg=moe_cfg, autocast=autocast)
                       for s, ids in zip(self.stage_ids, chunks)]
        self.n_stages = n_stages
        if model.word_embeddings is not None and not model.pre_process:  # the tied head's copy on the last stage
            model.word_embeddings.weight.pipeline_duplicate = True  # counted once in the grad norm (optimizer/base)
        self.seq_length = seq_length
        self.shape = (micro_batch_size, local_seq_length(model, seq_length, groups), hidden_size)
        self._schedules: Dict[Tuple[int, bool], object] = {}
        self._lm: List[torch.Tensor] = []  # this step's per-micro-batch lm losses (last stage)
        self._grad_scale = 1.0

    # ------------------------------------------------------------------------------------------- schedules
    def _stage(self, chunk: GPTChunk, stage_id: int) -> PipelineStage:
        """A PipelineStage with static shapes (no shape inference: it would run a forward of its own, moving
        router statistics and RNG streams). The activation keeps the parameters' dtype (the residual stream's,
        autocast or not)."""
        b, s_local, h = self.shape
        s = self.seq_length
        dtype = next(self.model.parameters()).dtype
        hidden = torch.empty(b, s_local, h, dtype=dtype, device=self.device, requires_grad=True)  # grads flow back
        inp = torch.empty(b, s, dtype=torch.long, device=self.device) if chunk.first else hidden
        out = torch.empty(b, s, dtype=torch.float32, device=self.device, requires_grad=True) if chunk.last else hidden
        return PipelineStage(chunk, stage_id, self.n_stages, self.device, input_args=(inp,), output_args=(out,),
                             group=self.groups.pp_group)

    def schedule(self, n_micro: int, training: bool):
        key = (n_micro, training)
        if key not in self._schedules:
            stages = [self._stage(c, sid) for c, sid in zip(self.chunks, self.stage_ids)]
            if len(stages) > 1:
                sched = ScheduleInterleaved1F1B(stages, n_micro, loss_fn=self._loss, scale_grads=False)
            else:
                cls = ScheduleGPipe if self.schedule_name == "gpipe" or not training else Schedule1F1B
                sched = cls(stages[0], n_micro, loss_fn=self._loss, scale_grads=False)
            self._schedules[key] = sched
        return self._schedules[key]

    def _loss(self, per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch: the masked mean lm loss times the step's gradient scale
        (loss scale / micro-batches, as the non-pipeline step multiplies its loss)."""
        lm = (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        self._lm.append(lm.detach())
        return lm * self._grad_scale

    # ------------------------------------------------------------------------------------------- steps
    def forward_backward(self, batches: List[tuple], loss_scale: float = 1.0):
        """Forward and backward of every micro-batch (tokens, labels, loss mask [b, s] each) through the pipeline.

        Returns (sum of the micro-batches' lm losses, [per micro-batch: MoEStats of every MoE layer of the whole
        model in layer order]), equal on every rank of the pipeline. Gradients: accumulated into .grad as the
        non-pipeline loop does (loss · loss_scale / micro-batches, aux losses included), the tied embedding's
        summed over the embedding group.
        Communication: the schedule's P2P over pp_group; an all-reduce of the tied gradient over the embedding
        group; an all-reduce of the loss and an all_gather_object of the MoE statistics over pp_group.
        """
        n = len(batches)
        tokens, labels, mask = (torch.cat([b[i] for b in batches]) for i in range(3))
        self._grad_scale = loss_scale / n
        for c in self.chunks:
            c.aux_grad_scale, c.stats = loss_scale / n, []
        self._lm = []
        sched = self.schedule(n, training=True)
        if self.pp_rank == 0:
            sched.step(tokens, labels=labels, target=mask)
        else:
            sched.step(labels=labels, target=mask)
        self.reduce_tied_gradients()
        return self._pp_sum(torch.stack(self._lm).sum() if self._lm else None), self._gather_stats(n)

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """The masked mean lm loss of one batch run forward through the pipeline, on every rank of it."""
        self._lm, self._grad_scale = [], 1.0
        sched = self.schedule(1, training=False)
        if self.pp_rank == 0:
            sched.eval(tokens, labels=labels, target=loss_mask)
        else:
            sched.eval(labels=labels, target=loss_mask)
        for c in self.chunks:
            c.stats = []
        return self._pp_sum(self._lm[0] if self._lm else None)

    # ------------------------------------------------------------------------------------------- around the step
    def reduce_tied_gradients(self) -> None:
        """Sums the word embedding's gradient over the first and last stage (the embedding and the tied LM head
        hold copies of one weight: Megatron-LM's _allreduce_word_embedding_grads)."""
        g = self.groups.embedding_group
        if g is None or self.model.cfg.untie_embeddings_and_output_weights:  # the same decision on both ends
            return
        w = self.model.word_embeddings.weight
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
        dist.all_reduce(grad, group=g)
        w.grad = grad

    def _pp_sum(self, value) -> torch.Tensor:
        """`value` (held by the last stage; None elsewhere) on every rank of the pipeline."""
        out = value.detach().clone().float() if value is not None else torch.zeros((), device=self.device)
        dist.all_reduce(out, group=self.groups.pp_group)
        return out

    def _gather_stats(self, n_micro: int) -> List[list]:
        """[micro-batch][MoE layer of the whole model, in layer order] MoEStats, from every stage (moved to the
        CPU for the object gather)."""
        local = [(sid, [[st._replace(**{k: v.cpu() for k, v in st._asdict().items()}) for st in per]
                        for per in c.stats]) for sid, c in zip(self.stage_ids, self.chunks) if c.stats]
        gathered: List = [None] * self.pp_size
        dist.all_gather_object(gathered, local, group=self.groups.pp_group)
        chunks = sorted((item for part in gathered for item in part), key=lambda kv: kv[0])
        return [[st for _, stats in chunks for st in stats[i]] for i in range(n_micro)]
