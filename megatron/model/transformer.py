"""Pre-norm transformer layer (LayerNorm or RMSNorm; MHA/GQA or MLA attention), the per-layer MLP factory (dense
MLP or MoE layer), and running the stack of layers with Megatron-LM's full activation recomputation
(`run_layers`)."""
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from megatron.config import ModelConfig
from megatron.model.attention import SelfAttention
from megatron.model.mla import MultiLatentAttention
from megatron.model.mlp import ParallelMLP
from megatron.model.norms import build_norm
from megatron.tensor_parallel import checkpoint, mark_sequence_parallel, tp_size


def sequence_parallel(groups) -> bool:
    """--sequence-parallel in effect: asked for (groups.sequence_parallel) and more than one TP rank."""
    return groups is not None and getattr(groups, "sequence_parallel", False) and tp_size(groups.tp_group) > 1


def context_parallel_group(groups):
    """The CP group when --context-parallel-size > 1, else None."""
    g = getattr(groups, "cp_group", None) if groups is not None else None
    return g if tp_size(g) > 1 else None


def token_group(groups):
    """The ranks holding other chunks of this rank's sequences (TP under SP, CP, or TP x CP; None: nobody), over
    which MoE routers sum their token statistics."""
    sp, cp = sequence_parallel(groups), context_parallel_group(groups) is not None
    if sp and cp:
        return groups.tp_cp_group
    return groups.tp_group if sp else (groups.cp_group if cp else None)


def build_mlp(layer_idx: int, cfg: ModelConfig, moe_cfg, groups, init_method, output_init_method):
    """The one place the model calls into moe/: a dense MLP, or a MoELayer where moe_cfg.layer_plan puts one."""
    spec = moe_cfg.layer_plan(cfg.num_layers)[layer_idx] if moe_cfg is not None else None
    if spec is None:
        return ParallelMLP(cfg.hidden_size, cfg.ffn_hidden_size, init_method, output_init_method,
                           groups.tp_group if groups is not None else None, activation=cfg.activation,
                           bias=cfg.add_bias_linear, sequence_parallel=sequence_parallel(groups))
    # MoE layers are replicated over tensor parallelism (DeepSpeed-MoE's default): every TP rank routes the same
    # tokens, and dispatches its 1/TP slice of them (DeepSpeed's drop_tokens) through the same experts; expert
    # parallelism runs among the ranks that share a TP rank. On the folded expert grid (--expert-tensor-parallel-size
    # > 1, or EP folded over TP/CP; megatron/parallel_state.py) the experts are laid out over the stage's ranks.
    from moe import MoELayer  # megatron/model may import moe/ (STYLE §2); lazily, to keep dense imports light

    i, num_experts, ep_size = spec  # per-layer EP sizes: each MoE layer uses its own EP group
    ep_group = groups.ep_group(ep_size) if groups is not None else None  # raises for a size never built
    if groups is None and ep_size != 1:
        raise ValueError(f"--moe-expert-parallel-size ({ep_size}) of MoE layer {i} needs process groups; build them "
                         f"with parallel_state.initialize(tp, ep_sizes) and pass them to GPTModel")
    ffn = moe_cfg.moe_ffn_hidden_size if moe_cfg.moe_ffn_hidden_size is not None else cfg.ffn_hidden_size
    layer = MoELayer(cfg.hidden_size, ffn, num_experts, moe_cfg, ep_group=ep_group,
                     init_method=init_method, output_layer_init_method=output_init_method,
                     activation=cfg.activation,  # experts compute the dense MLP's function (unless a checkpoint
                     #                             recorded another: MoEConfig.expert_activation)
                     bias=cfg.add_bias_linear,
                     dp_group=groups.dp_group if groups is not None else None,  # global_aux_loss counts
                     **_expert_grid_groups(groups, ep_size))
    layer.layer_index = i  # names this layer's expert files in checkpoints (megatron/checkpointing.py)
    # --sequence-parallel / CP: each rank routes its own sequence chunk through the (TP/CP-replicated) experts, no
    # gather; the router's loss statistics are summed over the chunks' ranks (moe/gating.py sp_group) and every
    # parameter's gradient, a partial sum over this rank's tokens, is summed after the backward (over TP: marked
    # sequence_parallel; over CP: every parameter, megatron/context_parallel.py)
    layer.router.sp_group = token_group(groups)
    if sequence_parallel(groups):  # (experts on the folded grid are not TP replicas: their grads stay as they are)
        folded = set(layer.experts.parameters()) if getattr(groups, "expert_folded", False) else set()
        mark_sequence_parallel([p for p in layer.parameters() if p not in folded])
    return layer


def _expert_grid_groups(groups, ep_size: int) -> dict:
    """MoELayer's etp_group, dedup_group and expert_grid (issue 27): TP ranks holding the same tokens dispatch
    disjoint slices of them (their experts' gradients are summed over an expert-DP group spanning TP)."""
    if groups is None:
        return {}
    folded = getattr(groups, "expert_folded", False)
    return {"etp_group": groups.etp_group(ep_size) if folded else None,
            "dedup_group": getattr(groups, "token_dedup_group", None), "expert_grid": folded}


class TransformerLayer(torch.nn.Module):
    """x + drop(attn(norm(x))), then x + drop(mlp(norm(x))); forward returns (x, moe_stats or None)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, init_method, output_init_method,
                 moe_cfg=None, groups=None, rng_tracker=None):
        super().__init__()
        self.hidden_dropout = cfg.hidden_dropout
        self.sequence_parallel = sequence_parallel(groups)
        # sequence parallel: hidden dropout acts on this rank's chunk, drawn from the TP tracker (Megatron-LM)
        self.rng_tracker = rng_tracker if self.sequence_parallel else None
        self.input_layernorm = build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        attention = MultiLatentAttention if cfg.multi_latent_attention else SelfAttention
        self.self_attention = attention(cfg, layer_idx, init_method, output_init_method,
                                        groups.tp_group if groups is not None else None, rng_tracker,
                                        sequence_parallel=self.sequence_parallel,
                                        cp_group=context_parallel_group(groups))
        self.post_attention_layernorm = build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        if self.sequence_parallel:  # the norms see this rank's chunk: partial gradients, summed over TP
            mark_sequence_parallel(list(self.input_layernorm.parameters())
                                   + list(self.post_attention_layernorm.parameters()))
        self.mlp = build_mlp(layer_idx, cfg, moe_cfg, groups, init_method, output_init_method)
        # called with the residual stream after attention (expert prefetch at inference, moe/offload); None = off
        self.after_attention: Optional[Callable[[torch.Tensor], None]] = None

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.rng_tracker is not None and self.training and self.hidden_dropout > 0:
            with self.rng_tracker.fork(x.device):
                return F.dropout(x, self.hidden_dropout, self.training)
        return F.dropout(x, self.hidden_dropout, self.training)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple] = None, kv_cache=None):
        attn = self.self_attention(self.input_layernorm(x), rotary, kv_cache)
        x = x + self._dropout(attn)
        if self.after_attention is not None:
            self.after_attention(x)
        mlp_out, stats = self.mlp(self.post_attention_layernorm(x))
        x = x + self._dropout(mlp_out)
        return x, stats

    def forward_many(self, xs: List[torch.Tensor], rotaries: List[Optional[tuple]]):
        """[forward(x, rotary) for ...] without a KV cache, the MLP applied to all micro-batches at once (a MoE
        layer then fetches each offloaded expert once for the list); returns (xs, stats per micro-batch)."""
        hs = [x + F.dropout(self.self_attention(self.input_layernorm(x), rot), self.hidden_dropout, self.training)
              for x, rot in zip(xs, rotaries)]
        normed = [self.post_attention_layernorm(h) for h in hs]
        many = getattr(self.mlp, "forward_many", None)
        outs = many(normed) if many is not None else [self.mlp(n) for n in normed]
        return ([h + F.dropout(o, self.hidden_dropout, self.training) for h, (o, _) in zip(hs, outs)],
                [st for _, st in outs])


def run_layers(layers, x: torch.Tensor, rotary, kv_cache, cfg: ModelConfig, rng_tracker=None):
    """x through every layer; returns (x, [MoE stats of each MoE layer in order]).

    With --recompute-granularity full while training (Megatron-LM's _checkpointed_forward), only the inputs of
    checkpointed spans are kept and everything inside is recomputed in the backward:
    - uniform: the layers in chunks of --recompute-num-layers, each chunk one checkpoint;
    - block: each of the first --recompute-num-layers layers its own checkpoint, the rest run normally.
    A MoE layer is recomputed with its span (router, dispatch, all-to-alls, experts): the default generators and
    the TP tracker are restored first, so the router draws the same noise/RTS priorities, makes the same choices
    and the recomputed all-to-alls have the same splits; every rank recomputes the same spans in the same backward
    order, so each all-to-all is matched across its EP group (megatron/tensor_parallel/random.py: checkpoint).
    """
    stats: List = []
    n = len(layers)
    full = cfg.recompute_granularity == "full" and layers.training and torch.is_grad_enabled() and kv_cache is None
    if not full:
        spans, ckpt = [(i, i + 1) for i in range(n)], [False] * n
    elif cfg.recompute_method == "uniform":
        step = cfg.recompute_num_layers
        spans = [(i, min(i + step, n)) for i in range(0, n, step)]
        ckpt = [True] * len(spans)
    else:  # block
        spans = [(i, i + 1) for i in range(n)]
        ckpt = [i < cfg.recompute_num_layers for i in range(n)]
    for (start, end), recompute in zip(spans, ckpt):
        def span(h, start=start, end=end):
            out = []
            for layer in layers[start:end]:
                h, st = layer(h, rotary, kv_cache)
                if st is not None:
                    out.append(st)
            return h, out
        x, st = checkpoint(span, rng_tracker, x) if recompute else span(x)
        stats.extend(st)
    return x, stats
