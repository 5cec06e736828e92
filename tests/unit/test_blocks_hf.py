"""Each Megatron-LM core block option against transformers' own module on copied weights (issue 25).

Everything runs in fp32 on both sides with the same weights and inputs; the two implementations order their
reductions differently (fused vs split projections, SDPA vs eager softmax), so outputs and gradients agree to fp32
round-off: rtol 1e-5 / atol 1e-5 on O(1) values (about 100 ulps at the sizes here, far below any real
difference, which would be O(1e-2) or more).
"""
import pytest
import torch
import torch.nn.functional as F

from megatron.config import ModelConfig
from megatron.model.attention import SelfAttention
from megatron.model.mla import MultiLatentAttention
from megatron.model.mlp import ParallelMLP
from megatron.model.norms import RMSNorm
from megatron.model.rope import RotaryEmbedding

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 round-off, see the module docstring
B, S, H = 2, 7, 64


def _close(got, want, what):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


def _cfg(**kw) -> ModelConfig:
    base = dict(num_layers=1, hidden_size=H, num_attention_heads=8, ffn_hidden_size=96, seq_length=S,
                max_position_embeddings=S, padded_vocab_size=128, hidden_dropout=0.0, attention_dropout=0.0,
                position_embedding_type="rope", normalization="RMSNorm", add_bias_linear=False)
    return ModelConfig(**{**base, **kw})


def _init(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm weights around 1), so a swapped or transposed copy cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _x(seed: int = 0, h: int = H) -> torch.Tensor:
    return torch.randn(B, S, h, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _causal_mask() -> torch.Tensor:
    """transformers' eager attention takes an additive [b, 1, s, s] mask: an independent causal reference."""
    return torch.full((S, S), float("-inf")).triu(1).expand(B, 1, S, S)


def _rotary(dim: int, base: float = 10000.0):
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    return RotaryEmbedding(dim, base)(pos)


def test_rmsnorm_equals_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref, mine = LlamaRMSNorm(H, eps=1e-6), RMSNorm(H, eps=1e-6)
    _init(ref, 1)
    mine.load_state_dict(ref.state_dict())
    x1, x2 = _x(), _x()
    y1, y2 = ref(x1), mine(x2)
    _close(y2, y1, "output")
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    _close(x2.grad, x1.grad, "input grad")
    _close(mine.weight.grad, ref.weight.grad, "weight grad")


def test_swiglu_mlp_equals_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    ref = LlamaMLP(LlamaConfig(hidden_size=H, intermediate_size=96, mlp_bias=False, hidden_act="silu"))
    _init(ref, 2)
    mine = ParallelMLP(H, 96, torch.nn.init.zeros_, torch.nn.init.zeros_, activation="swiglu", bias=False)
    with torch.no_grad():  # the fused first projection holds [gate; up]
        mine.dense_h_to_4h.weight.copy_(torch.cat((ref.gate_proj.weight, ref.up_proj.weight)))
        mine.dense_4h_to_h.weight.copy_(ref.down_proj.weight)
    x1, x2 = _x(), _x()
    y1, (y2, _) = ref(x1), mine(x2)
    _close(y2, y1, "output")
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    _close(x2.grad, x1.grad, "input grad")
    _close(mine.dense_h_to_4h.weight.grad, torch.cat((ref.gate_proj.weight.grad, ref.up_proj.weight.grad)), "fc1")
    _close(mine.dense_4h_to_h.weight.grad, ref.down_proj.weight.grad, "fc2")


def _gqa_qkv(q_w, k_w, v_w, groups: int, d: int) -> torch.Tensor:
    """transformers' separate q/k/v weights -> this model's fused GQA layout [groups, heads/groups + 2, d, h]."""
    h = q_w.shape[1]
    q = q_w.view(groups, -1, d, h)
    return torch.cat((q, k_w.view(groups, 1, d, h), v_w.view(groups, 1, d, h)), dim=1).reshape(-1, h)


def _attention_case(ref, mine, d, qk_norm: bool, base: float, rotary_dim: int):
    with torch.no_grad():
        mine.query_key_value.weight.copy_(_gqa_qkv(ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight,
                                                   mine.num_groups, d))
        mine.dense.weight.copy_(ref.o_proj.weight)
        if qk_norm:
            mine.q_layernorm.weight.copy_(ref.q_norm.weight)
            mine.k_layernorm.weight.copy_(ref.k_norm.weight)
    cos, sin = _rotary(rotary_dim, base)
    x1, x2 = _x(3), _x(3)
    y1 = ref(x1, position_embeddings=(cos[:, 0], sin[:, 0]), attention_mask=_causal_mask())[0]
    y2 = mine(x2, rotary=(cos, sin))
    _close(y2, y1, "output")
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    _close(x2.grad, x1.grad, "input grad")
    want = _gqa_qkv(ref.q_proj.weight.grad, ref.k_proj.weight.grad, ref.v_proj.weight.grad, mine.num_groups, d)
    _close(mine.query_key_value.weight.grad, want, "qkv grad")
    _close(mine.dense.weight.grad, ref.o_proj.weight.grad, "output projection grad")
    if qk_norm:
        _close(mine.q_layernorm.weight.grad, ref.q_norm.weight.grad, "q norm grad")
        _close(mine.k_layernorm.weight.grad, ref.k_norm.weight.grad, "k norm grad")


@pytest.mark.parametrize("groups,kv_channels", [(2, None), (8, 12), (1, None)], ids=["gqa", "mha-kv-channels", "mqa"])
def test_gqa_rope_attention_equals_llama_attention(groups, kv_channels):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    d = kv_channels or H // 8
    hf = LlamaConfig(hidden_size=H, num_attention_heads=8, num_key_value_heads=groups, head_dim=d,
                     attention_bias=False, attention_dropout=0.0, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 5000.0})
    hf._attn_implementation = "eager"
    ref = LlamaAttention(hf, layer_idx=0)
    _init(ref, 4)
    cfg = _cfg(num_query_groups=groups, kv_channels=kv_channels, rotary_base=5000.0)
    mine = SelfAttention(cfg, 0, torch.nn.init.zeros_, torch.nn.init.zeros_)
    _attention_case(ref, mine, d, qk_norm=False, base=5000.0, rotary_dim=cfg.rotary_dim)


def test_qk_layernorm_attention_equals_qwen3_attention():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    hf = Qwen3Config(hidden_size=H, num_attention_heads=8, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-6,
                     attention_bias=False, attention_dropout=0.0, num_hidden_layers=1,
                     layer_types=["full_attention"])
    hf._attn_implementation = "eager"
    ref = Qwen3Attention(hf, layer_idx=0)
    _init(ref, 5)
    cfg = _cfg(num_query_groups=4, kv_channels=16, qk_layernorm=True, layernorm_epsilon=1e-6,
               rotary_base=hf.rope_parameters["rope_theta"])
    mine = SelfAttention(cfg, 0, torch.nn.init.zeros_, torch.nn.init.zeros_)
    _attention_case(ref, mine, 16, qk_norm=True, base=cfg.rotary_base, rotary_dim=16)


_MLA_MAP = (("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"), ("linear_q_up_proj", "q_b_proj"),
            ("linear_q_proj", "q_proj"), ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
            ("kv_layernorm", "kv_a_layernorm"), ("linear_kv_up_proj", "kv_b_proj"), ("dense", "o_proj"))


@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["q-lora", "q-full"])
def test_mla_equals_deepseek_v3_attention(q_lora_rank):
    """DeepSeek-V3's MLA with rope_interleave=False (the interleaved form is the same function on rope rows
    permuted pairwise, a weight-conversion matter); no rope scaling (the flags refuse YaRN)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    hf = DeepseekV3Config(hidden_size=H, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
                          kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                          attention_bias=False, attention_dropout=0.0, rope_interleave=False, rms_norm_eps=1e-6)
    hf._attn_implementation = "eager"
    ref = DeepseekV3Attention(hf, layer_idx=0)
    _init(ref, 6)
    cfg = _cfg(num_attention_heads=4, multi_latent_attention=True, q_lora_rank=q_lora_rank, kv_lora_rank=16,
               qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=12, qk_layernorm=True, layernorm_epsilon=1e-6,
               rotary_base=hf.rope_parameters["rope_theta"])
    mine = MultiLatentAttention(cfg, 0, torch.nn.init.zeros_, torch.nn.init.zeros_)
    pairs = [(getattr(mine, a), getattr(ref, b)) for a, b in _MLA_MAP if getattr(ref, b, None) is not None]
    assert len(pairs) == (7 if q_lora_rank else 5)
    with torch.no_grad():
        for m, r in pairs:
            m.weight.copy_(r.weight)
    cos, sin = _rotary(4, cfg.rotary_base)
    x1, x2 = _x(7), _x(7)
    y1 = ref(x1, position_embeddings=(cos[:, 0], sin[:, 0]), attention_mask=_causal_mask())[0]
    y2 = mine(x2, rotary=(cos, sin))
    _close(y2, y1, "output")
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    _close(x2.grad, x1.grad, "input grad")
    for (a, b), (m, r) in zip([p for p in _MLA_MAP if getattr(ref, p[1], None) is not None], pairs):
        _close(m.weight.grad, r.weight.grad, f"{a} grad")
