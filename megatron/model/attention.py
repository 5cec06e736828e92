"""Causal self-attention (MHA or grouped-query): fused QKV projection, optional QK-norm, RoPE and KV cache,
scaled_dot_product_attention. Multi-latent attention (DeepSeek) subclasses it in mla.py.

With tensor parallelism the heads are split: QKV is column-parallel (each rank computes its heads' q, k, v), the
output projection row-parallel (partial products all-reduced), and attention dropout on this rank's heads draws
from the tensor-parallel RNG tracker. With sequence parallelism the input is this rank's sequence chunk
[b, s/tp, h]: the QKV projection all-gathers it and the output projection reduce-scatters back to [b, s/tp, h].
With context parallelism (cp_group) the queries are this CP rank's load-balanced chunks; keys and values are
all-gathered over CP (megatron/context_parallel.py) and the causal mask compares global positions.

Selective recomputation (`recompute_core_attention`, Megatron-LM's --recompute-granularity selective) keeps only
q, k, v of the core attention softmax(QK^T/sqrt(d))V and recomputes the rest (the [b, heads, s, s] probabilities
and their dropout mask, the largest activations at long sequence lengths) in the backward, with the same mask.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.context_parallel import gather_sequence, local_indices
from megatron.errors import ConfigError
from megatron.model.norms import build_norm
from megatron.model.rope import apply_rotary
from megatron.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, checkpoint,
                                      copy_to_tensor_parallel_region, tp_size)
from megatron.tensor_parallel.layers import divide


class KVCache:
    """Per-layer key/value buffers for incremental decoding: k, v [b, heads, max_len, d]."""

    def __init__(self, num_layers: int):
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.length = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat((self.keys[layer], k), dim=2)
            self.values[layer] = torch.cat((self.values[layer], v), dim=2)
        return self.keys[layer], self.values[layer]


class SelfAttention(torch.nn.Module):
    """Multi-head or grouped-query self-attention over this rank's heads.

    Projection layouts (output features of the fused column-parallel `query_key_value`):
    - MHA (cfg.num_query_groups None): [3, heads, d], split over TP with stride 3 (GPT-2 / Megatron's old layout);
    - GQA (--group-query-attention): [groups, heads/groups + 2, d] (each group's queries, then its key and value:
      Megatron-LM core's layout), split over TP by whole groups, so --num-query-groups must be divisible by TP.
    Query head i uses key/value group i // (heads/groups) (transformers' repeat_kv). With cfg.qk_layernorm each
    head's q and k go through the model's norm over d (weights shared by heads) before RoPE (Qwen3).
    forward(x [b, s, h], rotary (cos, sin) or None, kv_cache) -> [b, s, h].
    """

    def __init__(self, cfg, layer_idx: int, init_method, output_layer_init_method, tp_group=None,
                 rng_tracker=None, sequence_parallel: bool = False, cp_group=None):
        super().__init__()
        self.sequence_parallel = sequence_parallel and tp_size(tp_group) > 1
        self.cp_group = cp_group if tp_size(cp_group) > 1 else None
        self.recompute_core_attention = cfg.recompute_granularity == "selective"
        tp = tp_size(tp_group)
        self.num_heads = divide(cfg.num_attention_heads, tp, "--num-attention-heads")  # this rank's heads
        self.attention_dropout = cfg.attention_dropout
        self.layer_idx = layer_idx
        self.rng_tracker = rng_tracker if tp > 1 else None
        self.tp_group = tp_group if tp > 1 else None
        self._build_projections(cfg, init_method, output_layer_init_method, tp_group)

    def _build_projections(self, cfg, init_method, output_layer_init_method, tp_group) -> None:
        h, d, bias = cfg.hidden_size, cfg.head_dim, cfg.add_bias_linear
        self.head_dim = d
        self.grouped = cfg.num_query_groups is not None
        if self.grouped:
            self.num_groups = divide(cfg.num_query_groups, tp_size(tp_group), "--num-query-groups")
            out = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
            self.query_key_value = ColumnParallelLinear(h, out, tp_group, init_method, bias=bias or cfg.add_qkv_bias,
                                                        what="(heads + 2 x --num-query-groups) x head dim",
                                                        sequence_parallel=self.sequence_parallel)
        else:
            self.num_groups = self.num_heads
            # output features laid out [3, heads, head_dim]: stride 3 splits each of Q, K, V by heads
            self.query_key_value = ColumnParallelLinear(h, 3 * cfg.num_attention_heads * d, tp_group, init_method,
                                                        bias=bias or cfg.add_qkv_bias, stride=3,
                                                        what="3 x --hidden-size",
                                                        sequence_parallel=self.sequence_parallel)
        self.q_layernorm = self.k_layernorm = None
        self.qk_norm_full = cfg.qk_layernorm and cfg.qk_layernorm_full
        if self.qk_norm_full and tp_size(tp_group) > 1:
            raise ConfigError("qk_layernorm_full (one q/k norm over all heads, OLMoE) needs "
                              "--tensor-model-parallel-size 1")
        if cfg.qk_layernorm:  # per head over d, or (qk_layernorm_full) over all heads' q / all groups' k
            qn, kn = (cfg.num_attention_heads * d, cfg.query_groups * d) if self.qk_norm_full else (d, d)
            self.q_layernorm = build_norm(cfg.normalization, qn, cfg.layernorm_epsilon)
            self.k_layernorm = build_norm(cfg.normalization, kn, cfg.layernorm_epsilon)
        self.dense = RowParallelLinear(cfg.num_attention_heads * d, h, tp_group, output_layer_init_method, bias=bias,
                                       sequence_parallel=self.sequence_parallel)

    def _project(self, x: torch.Tensor, rotary: Optional[tuple]):
        """x [b, s, h] -> q [b, heads, s, d], k and v [b, groups, s, d] (this rank's), q/k normed and rotated
        (sequence parallel: x is [b, s/tp, h], gathered by the projection)."""
        qkv = self.query_key_value(x)
        b, s = qkv.shape[:2]
        if self.grouped:  # [b, s, groups, heads/groups + 2, d]
            qkv = qkv.view(b, s, self.num_groups, -1, self.head_dim)
            q = qkv[:, :, :, :-2].reshape(b, s, self.num_heads, self.head_dim)
            k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [b, s, groups, d]
        else:  # [b, s, 3, heads, d]
            q, k, v = qkv.view(b, s, 3, self.num_heads, self.head_dim).unbind(2)
        if self.qk_norm_full:
            q = self.q_layernorm(q.reshape(b, s, -1)).view(q.shape)
            k = self.k_layernorm(k.reshape(b, s, -1)).view(k.shape)
        elif self.q_layernorm is not None:
            q, k = self._head_norm(self.q_layernorm, q), self._head_norm(self.k_layernorm, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, s, n, d] -> [b, n, s, d]
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def _head_norm(self, norm: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        """norm(t) over each head's d. Under TP the norm's weights are replicated but each rank normalises only its
        own heads, so their gradient is a partial sum: the weights pass through copy_to_tensor_parallel_region
        (identity forward, all-reduce backward) and come out with the full gradient on every rank."""
        if self.tp_group is None:
            return norm(t)
        params = {n: copy_to_tensor_parallel_region(p, self.tp_group) for n, p in norm.named_parameters()}
        return torch.func.functional_call(norm, params, (t,))

    def forward(self, x: torch.Tensor, rotary: Optional[tuple] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        q, k, v = self._project(x, rotary)
        b, s = q.shape[0], q.shape[2]  # the whole sequence (x holds a chunk of it under sequence parallelism)
        past, qpos = 0, None
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
        if self.cp_group is not None:  # keys/values of the whole sequence; queries at their global positions
            n = tp_size(self.cp_group)
            qpos = local_indices(s * n, torch.distributed.get_rank(self.cp_group), n, q.device)
            k, v = gather_sequence(k, 2, self.cp_group), gather_sequence(v, 2, self.cp_group)
        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            ctx = checkpoint(self._core_attention, self.rng_tracker, q, k, v, past, s, qpos)
        else:
            ctx = self._core_attention(q, k, v, past, s, qpos)
        ctx = ctx.transpose(1, 2).reshape(b, s, -1)  # [b, heads, s, dv] -> [b, s, heads * dv]
        return self.dense(ctx)

    def _core_attention(self, q, k, v, past: int, s: int, qpos=None) -> torch.Tensor:
        """softmax(QK^T/sqrt(d))V with attention dropout (drawn from the TP tracker when heads are sharded)."""
        dropout_p = self.attention_dropout if self.training else 0.0
        rng = (self.rng_tracker.fork(q.device) if self.rng_tracker is not None and dropout_p > 0
               else contextlib.nullcontext())
        with rng:
            return self._attend(q, k, v, past, s, dropout_p, qpos)

    @staticmethod
    def _attend(q, k, v, past: int, s: int, dropout_p: float, qpos=None) -> torch.Tensor:
        """F.scaled_dot_product_attention (flash / memory-efficient kernels on CUDA where they apply); k, v with
        fewer heads than q (GQA) are shared by consecutive query heads (enable_gqa). qpos (context parallelism):
        the global positions of the queries; k, v hold the whole sequence, key j visible to query i iff j <= qpos[i]."""
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        if qpos is not None:
            mask = torch.arange(k.shape[2], device=q.device).unsqueeze(0) <= qpos.unsqueeze(1)  # [s/cp, s]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
        if past == 0:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
        elif s == 1:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **gqa)
        else:  # a chunk after a cached prefix: query i sees keys <= past + i
            kpos = torch.arange(past + s, device=q.device)
            qpos = torch.arange(past, past + s, device=q.device)
            mask = kpos.unsqueeze(0) <= qpos.unsqueeze(1)  # [s, past+s]
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
        return ctx
