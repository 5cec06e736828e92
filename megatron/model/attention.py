"""Causal self-attention: fused QKV projection, scaled_dot_product_attention, optional RoPE and KV cache.

With tensor parallelism the heads are split: QKV is column-parallel (each rank computes its heads' q, k, v), the
output projection row-parallel (partial products all-reduced), and attention dropout on this rank's heads draws
from the tensor-parallel RNG tracker.

Selective recomputation (`recompute_core_attention`, Megatron-LM's --recompute-granularity selective) keeps only
q, k, v of the core attention softmax(QK^T/sqrt(d))V and recomputes the rest (the [b, heads, s, s] probabilities
and their dropout mask, the largest activations at long sequence lengths) in the backward, with the same mask.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.model.rope import apply_rotary
from megatron.tensor_parallel import ColumnParallelLinear, RowParallelLinear, checkpoint, tp_size
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
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float,
                 init_method, output_layer_init_method, layer_idx: int, tp_group=None, rng_tracker=None,
                 recompute_core_attention: bool = False):
        super().__init__()
        self.recompute_core_attention = recompute_core_attention
        tp = tp_size(tp_group)
        self.num_heads = divide(num_heads, tp, "--num-attention-heads")  # this rank's heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.layer_idx = layer_idx
        self.rng_tracker = rng_tracker if tp > 1 else None
        # output features laid out [3, heads, head_dim]: stride 3 splits each of Q, K, V by heads
        self.query_key_value = ColumnParallelLinear(hidden_size, 3 * hidden_size, tp_group, init_method, stride=3,
                                                    what="3 x --hidden-size")
        self.dense = RowParallelLinear(hidden_size, hidden_size, tp_group, output_layer_init_method)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.query_key_value(x)  # [b, s, 3h/tp]
        # [b, s, 3, heads, d] -> 3 x [b, heads, s, d]
        q, k, v = qkv.view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            ctx = checkpoint(self._core_attention, self.rng_tracker, q, k, v, past, s)
        else:
            ctx = self._core_attention(q, k, v, past, s)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # [b, heads, s, d] -> [b, s, h/tp]
        return self.dense(ctx)

    def _core_attention(self, q, k, v, past: int, s: int) -> torch.Tensor:
        """softmax(QK^T/sqrt(d))V with attention dropout (drawn from the TP tracker when heads are sharded)."""
        dropout_p = self.attention_dropout if self.training else 0.0
        rng = (self.rng_tracker.fork(q.device) if self.rng_tracker is not None and dropout_p > 0
               else contextlib.nullcontext())
        with rng:
            return self._attend(q, k, v, past, s, dropout_p)

    @staticmethod
    def _attend(q, k, v, past: int, s: int, dropout_p: float) -> torch.Tensor:
        if past == 0:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif s == 1:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # a chunk after a cached prefix: query i sees keys <= past + i
            kpos = torch.arange(past + s, device=q.device)
            qpos = torch.arange(past, past + s, device=q.device)
            mask = kpos.unsqueeze(0) <= qpos.unsqueeze(1)  # [s, past+s]
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return ctx
