"""Causal self-attention: fused QKV projection, scaled_dot_product_attention, optional RoPE and KV cache."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.model.rope import apply_rotary


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
                 init_method, output_layer_init_method, layer_idx: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.layer_idx = layer_idx
        self.query_key_value = torch.nn.Linear(hidden_size, 3 * hidden_size)
        self.dense = torch.nn.Linear(hidden_size, hidden_size)
        init_method(self.query_key_value.weight)
        output_layer_init_method(self.dense.weight)
        torch.nn.init.zeros_(self.query_key_value.bias)
        torch.nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, rotary: Optional[tuple] = None,
                kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.query_key_value(x)  # [b, s, 3h]
        # [b, s, 3, heads, d] -> 3 x [b, heads, s, d]
        q, k, v = qkv.view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
        dropout_p = self.attention_dropout if self.training else 0.0
        if past == 0:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif s == 1:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # a chunk after a cached prefix: query i sees keys <= past + i
            kpos = torch.arange(past + s, device=x.device)
            qpos = torch.arange(past, past + s, device=x.device)
            mask = kpos.unsqueeze(0) <= qpos.unsqueeze(1)  # [s, past+s]
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        ctx = ctx.transpose(1, 2).reshape(b, s, h)  # [b, heads, s, d] -> [b, s, h]
        return self.dense(ctx)
