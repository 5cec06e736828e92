"""Multi-latent attention (DeepSeek-V2/V3): queries and keys/values through low-rank latents, with a decoupled
RoPE part whose key is shared by all heads; transformers' DeepseekV3Attention computes the same function.

Per token x [h]:  q = W_qU · norm(W_qD · x)  (or W_q · x without --q-lora-rank), per head [nope | rope];
[c_kv | k_rope] = W_kvD · x;  [k_nope | v] = W_kvU · norm(c_kv) per head;  k = [k_nope | RoPE(k_rope)] with
k_rope shared by the heads; q = [q_nope | RoPE(q_rope)]; attention scaled by 1/sqrt(nope + rope).
The latent norms are Megatron-LM's q_layernorm/kv_layernorm, present with --qk-layernorm (DeepSeek's config).

Tensor parallelism splits heads: the up projections and W_q are column-parallel, the output projection
row-parallel; the down projections and latent norms are replicated. Their gradients come out equal on every TP
rank because each branch they feed is all-reduced in the backward: the up projections' inputs by their own
copy_to_tensor_parallel_region, and the shared k_rope explicitly here.

Under sequence parallelism the input chunk [b, s/tp, h] is all-gathered once (backward: reduce-scatter) for all
the projections; the column-parallel ones then take it as it is (input_in_region), k_rope is not all-reduced, so
every gradient flowing back is this rank's partial sum (its heads), which the reduce-scatter sums; the replicated
down projections and latent norms hold partial gradients too and are marked sequence_parallel (summed over TP
after the backward).
"""
from typing import Optional

import torch

from megatron.model.attention import SelfAttention
from megatron.model.norms import build_norm
from megatron.model.rope import apply_rotary
from megatron.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, copy_to_tensor_parallel_region,
                                      gather_from_sequence_parallel_region, mark_sequence_parallel)


def _replicated_linear(n_in: int, n_out: int, bias: bool, init_method) -> torch.nn.Linear:
    layer = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        init_method(layer.weight)
        if bias:
            layer.bias.zero_()
    return layer


class MultiLatentAttention(SelfAttention):
    """SelfAttention with MLA projections (cfg.multi_latent_attention); forward, KV cache, selective recompute
    and the core attention are SelfAttention's. The KV cache holds the expanded per-head k and v."""

    def _build_projections(self, cfg, init_method, output_layer_init_method, tp_group) -> None:
        h, heads, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.add_bias_linear
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.head_dim = self.nope_dim + self.rope_dim
        self.num_groups = self.num_heads

        def norm(n: int):
            return build_norm(cfg.normalization, n, cfg.layernorm_epsilon) if cfg.qk_layernorm else torch.nn.Identity()

        q_out = heads * self.head_dim
        if cfg.q_lora_rank is None:
            self.linear_q_proj = ColumnParallelLinear(h, q_out, tp_group, init_method, bias=False,
                                                      what="heads x (--qk-head-dim + --qk-pos-emb-head-dim)",
                                                      input_in_region=self.sequence_parallel)
        else:
            self.linear_q_down_proj = _replicated_linear(h, cfg.q_lora_rank, bias, init_method)
            self.q_layernorm = norm(cfg.q_lora_rank)
            self.linear_q_up_proj = ColumnParallelLinear(cfg.q_lora_rank, q_out, tp_group, init_method, bias=False,
                                                         what="heads x (--qk-head-dim + --qk-pos-emb-head-dim)",
                                                      input_in_region=self.sequence_parallel)
        self.linear_kv_down_proj = _replicated_linear(h, cfg.kv_lora_rank + self.rope_dim, bias, init_method)
        self.kv_layernorm = norm(cfg.kv_lora_rank)
        self.linear_kv_up_proj = ColumnParallelLinear(cfg.kv_lora_rank, heads * (self.nope_dim + self.v_dim),
                                                      tp_group, init_method, bias=False,
                                                      what="heads x (--qk-head-dim + --v-head-dim)",
                                                      input_in_region=self.sequence_parallel)
        self.dense = RowParallelLinear(heads * self.v_dim, h, tp_group, output_layer_init_method, bias=bias,
                                       sequence_parallel=self.sequence_parallel)
        if self.sequence_parallel:  # replicated, fed by this rank's heads' partial gradients
            mark_sequence_parallel(p for n, p in self.named_parameters()
                                   if n.split(".")[0] in ("linear_q_down_proj", "q_layernorm", "linear_kv_down_proj",
                                                          "kv_layernorm"))

    def _project(self, x: torch.Tensor, rotary: Optional[tuple]):
        """x [b, s, h] -> q, k [b, heads, s, nope + rope] and v [b, heads, s, v_dim] of this rank's heads."""
        if self.sequence_parallel:  # once for every projection below
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        b, s, _ = x.shape
        if hasattr(self, "linear_q_proj"):
            q = self.linear_q_proj(x)
        else:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        q_nope, q_rope = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.linear_kv_down_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if self.tp_group is not None and not self.sequence_parallel:  # k_rope feeds this rank's heads only:
            # all-reduce its gradient over TP (under SP the reduce-scatter of x's gradient sums it instead)
            k_rope = copy_to_tensor_parallel_region(k_rope, self.tp_group)
        kv = self.linear_kv_up_proj(self.kv_layernorm(c_kv))  # [b, s, heads * (nope + v)]
        k_nope, v = kv.view(b, s, self.num_heads, -1).transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope.unsqueeze(1)  # [b, 1, s, rope]: one rotary key for all heads
        if rotary is not None:
            cos, sin = rotary
            q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return q, k, v
