"""Megatron-LM core's block and expert flags (issue 25): their definitions, their mapping onto ModelConfig and
MoEConfig fields (merged into the configs by megatron/arguments.py), their TP rule, and the flags of Megatron-LM that
are accepted with a note (no effect here) or refused in one line (they would change results)."""
from __future__ import annotations

import argparse

from megatron.config import ModelConfig
from megatron.errors import ConfigError
from moe.config import parse_layer_freq

# Flags of Megatron-LM core that cannot apply here: accepted with one note where they change nothing.
_CORE_NO_EFFECT = {
    "use_mcore_models": ("--use-mcore-models", "there is one model implementation here; nothing to change"),
    "no_masked_softmax_fusion": ("--no-masked-softmax-fusion", "attention is F.scaled_dot_product_attention"),
    "no_bias_swiglu_fusion": ("--no-bias-swiglu-fusion", "SwiGLU is computed unfused here; same result"),
    "no_bias_dropout_fusion": ("--no-bias-dropout-fusion", "bias and dropout are applied unfused here"),
    "no_rope_fusion": ("--no-rope-fusion", "RoPE is computed unfused (in fp32) here; same result"),
    "no_gradient_accumulation_fusion": ("--no-gradient-accumulation-fusion", "gradients accumulate in .grad"),
    "no_persist_layer_norm": ("--no-persist-layer-norm", "norms are torch modules here"),
    "use_flash_attn": ("--use-flash-attn", "F.scaled_dot_product_attention picks the flash kernel where it applies"),
    "moe_grouped_gemm": ("--moe-grouped-gemm", "experts always run as one grouped GEMM here (moe/experts.py)"),
    "moe_per_layer_logging": ("--moe-per-layer-logging", "the log prints every MoE layer's load on each log line"),
    "moe_shared_expert_overlap": ("--moe-shared-expert-overlap", "the shared expert runs beside the routed ones; "
                                                                  "no separate stream here"),
}

# ... and refused in one line where they would change results.
_CORE_REFUSED = {
    "apply_layernorm_1p": ("--apply-layernorm-1p", "zero-centred norm weights (1 + w) are not implemented here"),
    "rotary_interleaved": ("--rotary-interleaved", "interleaved RoPE pairs are not implemented here; permute the "
                                                   "rotary rows of the q/k weights to the rotate-half layout"),
    "use_rope_scaling": ("--use-rope-scaling", "Llama-3.1 RoPE scaling is not implemented here"),
}


def add_megatron_core_block_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM core's block (norm, SwiGLU, GQA, QK-norm, RoPE, MLA, biases, untied head) and expert flags."""
    g = p.add_argument_group("Megatron-LM core blocks and experts")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", dest="layernorm_epsilon", type=float, default=1e-5,
                   help="eps of every norm (same as --layernorm-epsilon)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLPs and experts (gate and up fused in one GEMM)")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None, help="key/value heads with --group-query-attention "
                                                                      "(default 1)")
    g.add_argument("--kv-channels", type=int, default=None, help="head dim (default hidden / heads)")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--qk-layernorm-full", action="store_true",
                   help="with --qk-layernorm: one norm over all heads' q (and k) together (OLMoE), TP 1 only")
    g.add_argument("--add-qkv-bias", action="store_true", help="biases on q/k/v even with --disable-bias-linear "
                                                              "(Qwen2)")
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--no-position-embedding", dest="add_position_embedding", action="store_false",
                   help="no learned absolute position table (RoPE, when chosen, still applies)")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--multi-latent-attention", action="store_true")
    g.add_argument("--q-lora-rank", type=int, default=None)
    g.add_argument("--kv-lora-rank", type=int, default=32)
    g.add_argument("--qk-head-dim", type=int, default=128)
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=64)
    g.add_argument("--v-head-dim", type=int, default=128)
    g.add_argument("--rotary-scaling-factor", type=float, default=1.0, help="only 1.0: no RoPE scaling here")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="scale the shared expert by sigmoid(x . w) per token (Qwen2-MoE)")
    g.add_argument("--moe-layer-freq", type=str, default=None,
                   help="N (layers 0, N, 2N, ... are MoE) or a list such as '([0]*3+[1]*5)'; default: "
                        "--expert-interval")
    g.add_argument("--expert-model-parallel-size", dest="moe_expert_parallel_size", type=int, nargs="+",
                   default=[1], help="same as --moe-expert-parallel-size")
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default=None)
    for dest, (flag, _) in {**_CORE_NO_EFFECT, **_CORE_REFUSED}.items():
        g.add_argument(flag, dest=dest, action="store_true")


def core_block_notes(args) -> list:
    notes = [f"{flag}: {why}" for dest, (flag, why) in _CORE_NO_EFFECT.items() if getattr(args, dest)]
    if args.transformer_impl == "transformer_engine":
        notes.append("--transformer-impl transformer_engine: TransformerEngine is not used here; the local "
                     "implementation computes the same layers")
    megatron_core_moe = args.moe_grouped_gemm or args.moe_token_dispatcher_type is not None
    if megatron_core_moe and args.moe_layer_freq is None and list(args.num_experts) != [1]:
        notes.append(f"--moe-layer-freq not given: MoE layers every --expert-interval ({args.expert_interval}) "
                     f"layers (DeepSpeed's default); Megatron-LM puts one on every layer: add --moe-layer-freq 1")
    if args.moe_token_dispatcher_type is not None:
        notes.append(f"--moe-token-dispatcher-type {args.moe_token_dispatcher_type}: tokens are always sorted by "
                     f"expert and exchanged with all-to-all over the EP group here (same results)")
    return notes


def _core_activation(args) -> str:
    if not args.swiglu:
        return "gelu_tanh" if args.bias_gelu_fusion or args.openai_gelu else "gelu"
    if args.openai_gelu or not args.bias_gelu_fusion:
        raise ConfigError("--swiglu replaces the GELU; drop --openai-gelu/--no-bias-gelu-fusion")
    return "swiglu"


def core_block_fields(args) -> dict:
    """ModelConfig fields of the Megatron-LM core block flags."""
    for dest, (flag, why) in _CORE_REFUSED.items():
        if getattr(args, dest):
            raise ConfigError(f"{flag}: {why}; drop the flag")
    if args.rotary_scaling_factor != 1.0:
        raise ConfigError(f"--rotary-scaling-factor {args.rotary_scaling_factor}: RoPE scaling (YaRN) is not "
                          f"implemented here; use 1.0")
    if args.num_query_groups is not None and not args.group_query_attention:
        raise ConfigError(f"--num-query-groups {args.num_query_groups} needs --group-query-attention (without it "
                          f"every head has its own key/value)")
    position = args.position_embedding_type
    if not args.add_position_embedding and position == "learned_absolute":
        position = "none"
    return dict(
        normalization=args.normalization,
        activation=_core_activation(args),
        num_query_groups=((args.num_query_groups if args.num_query_groups is not None else 1)
                          if args.group_query_attention else None),  # Megatron-LM: 1 (MQA) when not given
        kv_channels=args.kv_channels,
        qk_layernorm=args.qk_layernorm,
        qk_layernorm_full=args.qk_layernorm_full,
        add_qkv_bias=args.add_qkv_bias,
        position_embedding_type=position,
        rotary_percent=args.rotary_percent,
        add_bias_linear=args.add_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        multi_latent_attention=args.multi_latent_attention,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_head_dim=args.qk_head_dim,
        qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
        v_head_dim=args.v_head_dim,
    )


def _layer_freq(text):
    if text is None:
        return None
    try:
        return parse_layer_freq(text)
    except ValueError as e:  # moe/ raises ValueError (it may not import megatron.errors)
        raise ConfigError(str(e)) from None


def core_moe_fields(args) -> dict:
    """MoEConfig fields of the Megatron-LM core expert flags."""
    return dict(
        layer_freq=_layer_freq(args.moe_layer_freq),
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        shared_expert_ffn_hidden_size=args.moe_shared_expert_intermediate_size,
        shared_expert_gate=args.moe_shared_expert_gate,
    )


def validate_core_blocks(m: ModelConfig, tp: int) -> None:
    """TP rules of the new blocks: whole key/value groups per rank; SwiGLU halves split alike (ffn % tp)."""
    if m.num_query_groups is not None and m.num_query_groups % tp != 0:
        raise ConfigError(f"--num-query-groups ({m.num_query_groups}) must be divisible by "
                          f"--tensor-model-parallel-size ({tp}): each rank holds whole key/value groups")
