"""Hugging Face config.json <-> (ModelConfig, MoEConfig) for the Llama-style families (issue 26).

Every field of a family's config that changes the forward computation is either mapped here or refused in one line
naming it (`ConfigError`); fields that only matter to training in transformers (router_aux_loss_coef) are mapped
where this project has the same setting, and purely bookkeeping fields (use_cache, token ids, dtype) are ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from megatron.config import ModelConfig
from megatron.errors import ConfigError
from moe.config import MoEConfig

# architectures -> family key; the family decides the weight names (megatron/hf/weights.py)
FAMILIES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
            "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe", "DeepseekV3ForCausalLM": "deepseek_v3"}
MODEL_TYPES = {v: v for v in FAMILIES.values()}  # config.json model_type of each family (the same spelling)


def _rope(hf, arch: str) -> float:
    rp = getattr(hf, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "full_attention" in rp:  # per layer-type parameters
        rp = rp["full_attention"]
    kind = rp.get("rope_type", "default")
    if kind not in (None, "default"):
        raise ConfigError(f"{arch} config: rope_parameters.rope_type {kind!r} (RoPE scaling) is not supported; "
                          f"only 'default' RoPE is implemented")
    return float(rp.get("rope_theta", 10000.0))


def _refuse(arch: str, checks) -> None:
    for ok, why in checks:
        if not ok:
            raise ConfigError(f"{arch} config: {why}")


def _sliding(hf) -> bool:
    """Sliding-window attention on? Qwen's use_sliding_window switches it; elsewhere a set sliding_window does."""
    on = getattr(hf, "use_sliding_window", None)
    return bool(on) if on is not None else getattr(hf, "sliding_window", None) not in (None, 0)


def _common(hf, arch: str) -> dict:
    """The Llama block: RMSNorm, SwiGLU, RoPE, (GQA) attention, optional untied head."""
    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    layer_types = getattr(hf, "layer_types", None) or []
    _refuse(arch, [
        (hf.hidden_act == "silu", f"hidden_act {hf.hidden_act!r}: only 'silu' (SwiGLU) is supported"),
        (not _sliding(hf), f"sliding_window {getattr(hf, 'sliding_window', None)} (sliding-window attention) is not supported"),
        (all(t == "full_attention" for t in layer_types), f"layer_types {sorted(set(layer_types))}: only "
                                                          f"full_attention layers are supported"),
        (getattr(hf, "partial_rotary_factor", 1.0) in (None, 1.0),
         "partial_rotary_factor != 1 is not supported by this importer"),
    ])
    return dict(num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=heads,
                ffn_hidden_size=hf.intermediate_size, seq_length=hf.max_position_embeddings,
                max_position_embeddings=hf.max_position_embeddings, padded_vocab_size=hf.vocab_size,
                hidden_dropout=0.0, attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),
                init_method_std=hf.initializer_range, position_embedding_type="rope", rotary_base=_rope(hf, arch),
                layernorm_epsilon=hf.rms_norm_eps, activation="swiglu", normalization="RMSNorm",
                num_query_groups=None if kv == heads else kv,
                kv_channels=None if head_dim * heads == hf.hidden_size else head_dim, add_bias_linear=False,
                untie_embeddings_and_output_weights=not hf.tie_word_embeddings)


def _bias(hf, arch: str) -> dict:
    """attention_bias (Llama, OLMoE, Qwen3-MoE: q/k/v/o), mlp_bias (Llama), qkv_bias (Qwen2-MoE: q/k/v only)."""
    attn, mlp = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
    qkv = bool(getattr(hf, "qkv_bias", False))
    if attn or mlp:
        raise ConfigError(f"{arch} config: attention_bias={attn}, mlp_bias={mlp}: biases on the attention output "
                          f"or MLP projections are not supported by this importer (set both false)")
    return {"add_qkv_bias": qkv} if qkv else {}


def _router(hf, arch: str, num_experts: int, plan, moe_ffn: int, **extra) -> MoEConfig:
    jitter = getattr(hf, "router_jitter_noise", 0.0) or 0.0
    _refuse(arch, [(jitter == 0.0, f"router_jitter_noise {jitter} (jitter on the expert inputs in training) is "
                                   f"not supported; set it to 0")])
    return MoEConfig(num_experts=num_experts, topk=hf.num_experts_per_tok,
                     layer_freq=1 if all(plan) else tuple(plan), moe_ffn_hidden_size=moe_ffn,
                     router_family="megatron", drop_tokens=False, min_capacity=0,
                     loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0), **extra)


def _softmax_topk(hf, arch: str, renormalise: bool) -> dict:
    """softmax over all experts, top-k; renormalised over the k (= top-k logits then softmax: pre_softmax False)."""
    if renormalise and hf.num_experts_per_tok == 1:
        return {"pre_softmax": True}  # one choice renormalised is weight 1: refuse rather than reweight
    return {"pre_softmax": not renormalise}


def from_hf(hf, arch: str) -> Tuple[ModelConfig, Optional[MoEConfig]]:
    """(ModelConfig, MoEConfig or None) of a transformers config object of one of FAMILIES."""
    if arch not in FAMILIES:
        raise ConfigError(f"architecture {arch!r} is not supported; supported: GPT2LMHeadModel, "
                          f"{', '.join(FAMILIES)}")
    fam = FAMILIES[arch]
    if fam == "deepseek_v3":
        return _deepseek_v3(hf, arch)
    common = _common(hf, arch)
    n = hf.num_hidden_layers
    if fam == "llama":
        _refuse(arch, [(getattr(hf, "pretraining_tp", 1) in (None, 1), "pretraining_tp != 1 is not supported")])
        return ModelConfig(**common, **_bias(hf, arch)), None
    if fam == "mixtral":
        moe = _router(hf, arch, hf.num_local_experts, [1] * n, hf.intermediate_size, pre_softmax=False)
        return ModelConfig(**common), moe
    if fam == "olmoe":
        _refuse(arch, [(getattr(hf, "clip_qkv", None) is None, f"clip_qkv {hf.clip_qkv} is not supported")])
        if hf.norm_topk_prob and hf.num_experts_per_tok == 1:
            raise ConfigError(f"{arch} config: norm_topk_prob with num_experts_per_tok 1 is not supported")
        cfg = ModelConfig(**common, qk_layernorm=True, qk_layernorm_full=True, **_bias(hf, arch))
        return cfg, _router(hf, arch, hf.num_experts, [1] * n, hf.intermediate_size,
                            **_softmax_topk(hf, arch, hf.norm_topk_prob))
    # qwen2_moe / qwen3_moe: MoE where i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    step, dense_only = hf.decoder_sparse_step, set(hf.mlp_only_layers or [])
    plan = [int(i not in dense_only and hf.num_experts > 0 and (i + 1) % step == 0) for i in range(n)]
    if hf.norm_topk_prob and hf.num_experts_per_tok == 1:
        raise ConfigError(f"{arch} config: norm_topk_prob with num_experts_per_tok 1 is not supported")
    extra = _softmax_topk(hf, arch, hf.norm_topk_prob)
    if fam == "qwen2_moe":
        extra.update(shared_expert_ffn_hidden_size=hf.shared_expert_intermediate_size, shared_expert_gate=True)
        if not hf.shared_expert_intermediate_size:
            raise ConfigError(f"{arch} config: shared_expert_intermediate_size 0 is not supported")
        cfg = ModelConfig(**common, **_bias(hf, arch))
    else:
        cfg = ModelConfig(**common, qk_layernorm=True, **_bias(hf, arch))
    if 1 not in plan:
        raise ConfigError(f"{arch} config: mlp_only_layers/decoder_sparse_step leave no MoE layer; import it as a "
                          f"dense model is not supported")
    return cfg, _router(hf, arch, hf.num_experts, plan, hf.moe_intermediate_size, **extra)


def _deepseek_v3(hf, arch: str) -> Tuple[ModelConfig, MoEConfig]:
    k, groups, gk = hf.num_experts_per_tok, hf.n_group, hf.topk_group
    grouped = groups is not None and groups > 1 and gk is not None and gk < groups
    _refuse(arch, [
        (hf.hidden_act == "silu", f"hidden_act {hf.hidden_act!r}: only 'silu' (SwiGLU) is supported"),
        (not hf.attention_bias, "attention_bias true is not supported"),
        (bool(hf.norm_topk_prob) == (k > 1), f"norm_topk_prob {str(bool(hf.norm_topk_prob)).lower()} with "
         f"num_experts_per_tok {k}: megatron-core's sigmoid router renormalises exactly when k > 1"),
        (not grouped or k // gk == 2 and k % gk == 0,
         f"num_experts_per_tok {k} / topk_group {gk} != 2: transformers scores a group by its best 2 experts, "
         f"megatron-core by its best k/topk_group; only k = 2 x topk_group maps"),
    ])
    n = hf.num_hidden_layers
    cfg = ModelConfig(num_layers=n, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
                      ffn_hidden_size=hf.intermediate_size, seq_length=hf.max_position_embeddings,
                      max_position_embeddings=hf.max_position_embeddings, padded_vocab_size=hf.vocab_size,
                      hidden_dropout=0.0, attention_dropout=float(hf.attention_dropout or 0.0),
                      init_method_std=hf.initializer_range, position_embedding_type="rope",
                      rotary_base=_rope(hf, arch), layernorm_epsilon=hf.rms_norm_eps, activation="swiglu",
                      normalization="RMSNorm", add_bias_linear=False,
                      untie_embeddings_and_output_weights=not hf.tie_word_embeddings, multi_latent_attention=True,
                      q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank, qk_head_dim=hf.qk_nope_head_dim,
                      qk_pos_emb_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim, qk_layernorm=True)
    plan = [int(i >= hf.first_k_dense_replace) for i in range(n)]
    shared = hf.n_shared_experts * hf.moe_intermediate_size if hf.n_shared_experts else None
    moe = _router(hf, arch, hf.n_routed_experts, plan, hf.moe_intermediate_size, score_function="sigmoid",
                  expert_bias=True, topk_scaling_factor=float(hf.routed_scaling_factor),
                  num_groups=groups if grouped else None, group_topk=gk if grouped else None,
                  shared_expert_ffn_hidden_size=shared)
    return cfg, moe


# --------------------------------------------------------------------------------------------- export direction
def infer_architecture(cfg: ModelConfig, moe: Optional[MoEConfig]) -> str:
    """The transformers architecture that computes this model's function (refusing what none does)."""
    if moe is None:
        return "LlamaForCausalLM"
    if cfg.multi_latent_attention:
        return "DeepseekV3ForCausalLM"
    if moe.shared_expert_ffn_hidden_size is not None:
        return "Qwen2MoeForCausalLM"
    if getattr(cfg, "qk_layernorm_full", False):
        return "OlmoeForCausalLM"
    if cfg.qk_layernorm:
        return "Qwen3MoeForCausalLM"
    return "MixtralForCausalLM"


def to_hf(cfg: ModelConfig, moe: Optional[MoEConfig], arch: str, base: Optional[dict] = None) -> dict:
    """config.json dict (transformers' field names) for `arch` computing this model; ConfigError naming the first
    setting the architecture cannot express. `base`: a recorded config.json whose non-computational fields (token
    ids, ...) are kept."""
    why = _inexpressible(cfg, moe, arch)
    if why:
        raise ConfigError(f"export as {arch}: {why}; this checkpoint cannot be written as that architecture "
                          f"(use --format safetensors)")
    out = {k: v for k, v in (base or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    fam = FAMILIES[arch]
    out.update(architectures=[arch], model_type=MODEL_TYPES[fam], vocab_size=cfg.padded_vocab_size,
               hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
               hidden_act="silu", max_position_embeddings=max(cfg.max_position_embeddings, cfg.seq_length),
               initializer_range=cfg.init_method_std, rms_norm_eps=cfg.layernorm_epsilon,
               tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
               rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
               attention_dropout=cfg.attention_dropout, dtype="float32")
    if fam == "deepseek_v3":
        plan = moe.is_moe_pattern(cfg.num_layers)
        k = plan.index(True)
        out.update(num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
                   kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_head_dim,
                   qk_rope_head_dim=cfg.qk_pos_emb_head_dim, v_head_dim=cfg.v_head_dim, head_dim=cfg.qk_pos_emb_head_dim,
                   rope_interleave=False, attention_bias=False, first_k_dense_replace=k,
                   n_routed_experts=moe.num_experts[0], num_experts_per_tok=moe.topk,
                   moe_intermediate_size=moe.moe_ffn_hidden_size or cfg.ffn_hidden_size,
                   n_shared_experts=_n_shared(moe, cfg), norm_topk_prob=moe.topk > 1,
                   routed_scaling_factor=moe.topk_scaling_factor or 1.0, n_group=moe.num_groups or 1,
                   topk_group=moe.group_topk or 1, num_nextn_predict_layers=0)
        return out
    out.update(num_key_value_heads=cfg.query_groups, head_dim=cfg.head_dim)
    if fam == "llama":
        out.update(attention_bias=False, mlp_bias=False)
        return out
    out.update(num_experts_per_tok=moe.topk, router_aux_loss_coef=moe.loss_coeff, output_router_logits=False)
    if fam == "mixtral":
        out.update(num_local_experts=moe.num_experts[0], sliding_window=None, router_jitter_noise=0.0)
        out["intermediate_size"] = moe.moe_ffn_hidden_size or cfg.ffn_hidden_size
        return out
    if fam == "olmoe":
        out.update(num_experts=moe.num_experts[0], norm_topk_prob=not moe.pre_softmax, clip_qkv=None,
                   attention_bias=False, intermediate_size=moe.moe_ffn_hidden_size or cfg.ffn_hidden_size)
        return out
    plan = moe.is_moe_pattern(cfg.num_layers)
    out.update(num_experts=moe.num_experts[0], norm_topk_prob=not moe.pre_softmax, decoder_sparse_step=1,
               mlp_only_layers=[i for i, m in enumerate(plan) if not m], use_sliding_window=False,
               moe_intermediate_size=moe.moe_ffn_hidden_size or cfg.ffn_hidden_size)
    if fam == "qwen2_moe":
        out.update(shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
                   qkv_bias=bool(getattr(cfg, "add_qkv_bias", False)))
    else:
        out.update(attention_bias=False)
    return out


def _n_shared(moe: MoEConfig, cfg: ModelConfig) -> int:
    f = moe.moe_ffn_hidden_size or cfg.ffn_hidden_size
    return (moe.shared_expert_ffn_hidden_size or 0) // f


def _inexpressible(cfg: ModelConfig, moe: Optional[MoEConfig], arch: str) -> Optional[str]:
    """First setting of (cfg, moe) that `arch` cannot compute, as text; None if it can."""
    fam = FAMILIES.get(arch)
    if fam is None:
        return f"unknown architecture {arch!r} (supported: {', '.join(FAMILIES)})"
    checks = [
        (cfg.normalization == "RMSNorm", f"--normalization {cfg.normalization}"),
        (cfg.activation == "swiglu", f"activation {cfg.activation}"),
        (cfg.position_embedding_type == "rope", f"--position-embedding-type {cfg.position_embedding_type}"),
        (cfg.rotary_percent == 1.0, f"--rotary-percent {cfg.rotary_percent}"),
        (not cfg.add_bias_linear, "biases on every linear (use --disable-bias-linear)"),
        ((moe is None) == (fam == "llama"), "dense/MoE mismatch"),
        (cfg.multi_latent_attention == (fam == "deepseek_v3"), f"--multi-latent-attention {cfg.multi_latent_attention}"),
    ]
    if moe is not None:
        plan = moe.is_moe_pattern(cfg.num_layers)
        checks += [
            (moe.router_family == "megatron", "router_family deepspeed (DeepSpeed gating has no HF equivalent)"),
            (len(set(moe.num_experts)) == 1, "different expert counts per layer"),
            (not moe.drop_tokens, "token dropping (capacity factor)"),
            (moe.mlp_type == "standard", f"--mlp-type {moe.mlp_type}"),
        ]
        if fam == "deepseek_v3":
            k = plan.index(True)
            checks += [(moe.score_function == "sigmoid" and moe.expert_bias, "softmax routing / no expert bias"),
                       (all(plan[k:]) and not any(plan[:k]), "MoE layers other than first_k_dense_replace..end"),
                       (moe.shared_expert_ffn_hidden_size is None or
                        _n_shared(moe, cfg) * (moe.moe_ffn_hidden_size or cfg.ffn_hidden_size)
                        == moe.shared_expert_ffn_hidden_size, "shared expert width not a multiple of the expert's"),
                       (not moe.shared_expert_gate, "--moe-shared-expert-gate"),
                       (moe.num_groups is None or moe.topk // moe.group_topk == 2, "group top-k other than k/2")]
        else:
            checks += [(moe.score_function == "softmax" and moe.topk_scaling_factor in (None, 1.0)
                        and moe.num_groups is None, "sigmoid/scaled/grouped routing")]
            if fam in ("mixtral", "olmoe"):
                checks += [(all(plan), "dense layers between MoE layers")]
            if fam == "mixtral":
                checks += [(not moe.pre_softmax, "--moe-router-pre-softmax (Mixtral renormalises the top-k)")]
            if fam == "qwen2_moe":
                checks += [(moe.shared_expert_gate, "shared expert without --moe-shared-expert-gate")]
            else:
                checks += [(moe.shared_expert_ffn_hidden_size is None, "a shared expert")]
            checks += [(cfg.qk_layernorm == (fam in ("qwen3_moe", "olmoe")), f"--qk-layernorm {cfg.qk_layernorm}"),
                       (getattr(cfg, "qk_layernorm_full", False) == (fam == "olmoe"), "qk_layernorm_full")]
    if fam not in ("deepseek_v3",):
        checks += [(not cfg.qk_layernorm or fam in ("qwen3_moe", "olmoe"), "--qk-layernorm"),
                   (not getattr(cfg, "add_qkv_bias", False) or fam == "qwen2_moe", "--add-qkv-bias")]
    for ok, why in checks:
        if not ok:
            return why
    return None


def recorded(cfg, moe) -> dict:
    return {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe) if moe is not None else None}


def training_flags(cfg: ModelConfig, moe: Optional[MoEConfig], tokenizer_model: Optional[str] = None,
                   seq_length: Optional[int] = None) -> list:
    """pretrain_gpt.py flags that build this model (to continue training an import with --load ... --finetune);
    tests/unit/test_hf_families.py parses them back into the same configs."""
    f = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size, "--ffn-hidden-size", cfg.ffn_hidden_size,
         "--num-attention-heads", cfg.num_attention_heads,
         "--seq-length", seq_length or min(cfg.seq_length, 4096), "--max-position-embeddings",
         cfg.max_position_embeddings, "--position-embedding-type", "rope", "--rotary-base", cfg.rotary_base,
         "--normalization", cfg.normalization, "--norm-epsilon", cfg.layernorm_epsilon, "--swiglu",
         "--disable-bias-linear", "--init-method-std", cfg.init_method_std, "--hidden-dropout", cfg.hidden_dropout,
         "--attention-dropout", cfg.attention_dropout, "--make-vocab-size-divisible-by", 1]
    f += ["--add-qkv-bias"] * cfg.add_qkv_bias + ["--untie-embeddings-and-output-weights"] * \
        cfg.untie_embeddings_and_output_weights + ["--qk-layernorm"] * cfg.qk_layernorm + \
        ["--qk-layernorm-full"] * cfg.qk_layernorm_full
    if cfg.num_query_groups is not None:
        f += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups]
    if cfg.kv_channels is not None:
        f += ["--kv-channels", cfg.kv_channels]
    if cfg.multi_latent_attention:
        f += ["--multi-latent-attention", "--kv-lora-rank", cfg.kv_lora_rank, "--qk-head-dim", cfg.qk_head_dim,
              "--qk-pos-emb-head-dim", cfg.qk_pos_emb_head_dim, "--v-head-dim", cfg.v_head_dim]
        f += ["--q-lora-rank", cfg.q_lora_rank] if cfg.q_lora_rank is not None else []
    if moe is not None:
        plan = [int(m) for m in moe.is_moe_pattern(cfg.num_layers)]
        f += ["--num-experts", moe.num_experts[0], "--moe-layer-freq", "1" if all(plan) else str(plan).replace(" ", ""),
              "--moe-ffn-hidden-size", moe.moe_ffn_hidden_size or cfg.ffn_hidden_size, "--moe-router-topk", moe.topk,
              "--moe-router-score-function", moe.score_function, "--moe-aux-loss-coeff", moe.loss_coeff,
              "--expert-model-parallel-size", moe.ep_size[0]]
        f += ["--moe-router-pre-softmax"] * moe.pre_softmax + ["--moe-router-enable-expert-bias"] * moe.expert_bias
        if moe.topk_scaling_factor is not None:
            f += ["--moe-router-topk-scaling-factor", moe.topk_scaling_factor]
        if moe.num_groups is not None:
            f += ["--moe-router-num-groups", moe.num_groups, "--moe-router-group-topk", moe.group_topk]
        if moe.shared_expert_ffn_hidden_size is not None:
            f += ["--moe-shared-expert-intermediate-size", moe.shared_expert_ffn_hidden_size]
            f += ["--moe-shared-expert-gate"] * moe.shared_expert_gate
    if tokenizer_model:
        f += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_model]
    return [str(x) for x in f]
