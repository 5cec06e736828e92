"""The only argparse code: Megatron-DeepSpeed flag definitions and their mapping onto TrainConfig fields.

The one validation pass: each config dataclass checks its own concern in `__post_init__` as it is built here, and
`validate` checks what spans several. Every problem is a ConfigError naming the flag (moe's dataclasses, which may
not import megatron, raise ValueError; `_checked` turns those into ConfigError at the point of mapping).
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence, Tuple

from megatron import parallel_state
from megatron.config import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimizerConfig,
                             ParallelConfig, SchedulerConfig, TokenizerConfig, TrainConfig, num_moe_layers)
from megatron.errors import ConfigError, UserError
from moe.distill import DistillConfig, validate_distill


def _checked(build, *args, **kwargs):
    """build(*args, **kwargs), with a ValueError from a `moe` config check (whose messages name the flag) raised
    as the ConfigError it is. Only for building config objects: their checks are the only ValueErrors there."""
    try:
        return build(*args, **kwargs)
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _none_or_str(v: str) -> Optional[str]:
    return None if v in ("None", "none", "") else v


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                   help="MLP and expert activation: exact (erf) GELU instead of the fused bias-GeLU's tanh "
                        "approximation (as Megatron without the fusion)")
    g.add_argument("--openai-gelu", action="store_true",
                   help="tanh-approximate GELU even with --no-bias-gelu-fusion (Megatron's openai_gelu)")


def add_moe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, nargs="+", default=[1],
                   help="experts per MoE layer: one value for all, or one per MoE layer (pyramid); 1 = dense")
    g.add_argument("--expert-interval", type=int, default=2, help="MoE replaces the MLP every N-th layer")
    g.add_argument("--topk", type=int, default=1)
    g.add_argument("--moe-expert-parallel-size", type=int, nargs="+", default=[1])
    g.add_argument("--moe-train-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-eval-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-min-capacity", type=int, default=4)
    g.add_argument("--moe-loss-coeff", type=float, default=0.01)
    g.add_argument("--disable-moe-token-dropping", action="store_true")
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-noisy-gate-policy", type=_none_or_str, default=None, choices=[None, "Jitter", "RSample"])
    g.add_argument("--moe-use-rts", dest="moe_use_rts", action="store_true", default=True)
    g.add_argument("--no-moe-use-rts", dest="moe_use_rts", action="store_false")
    g.add_argument("--moe-token-drop-policy", choices=["position", "probs", "any"], default=None,
                   help="which routed tokens an over-full expert keeps; default: DeepSpeed's for --topk (any for "
                        "1, position for 2, probs above)")
    g.add_argument("--disable-moe-top2-2nd-expert-sampling", dest="moe_top2_2nd_expert_sampling",
                   action="store_false", help="top-2: take the 2nd expert by argmax instead of Gumbel sampling")
    g.add_argument("--mlp-type", choices=["standard", "residual"], default="standard")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-tokens", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_true",
                   default=True, help="(default) bf16/fp32: a NaN/Inf loss or gradient stops training before the "
                                      "optimizer step, naming the iteration, rank and MoE layer")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="let non-finite steps through (Megatron-LM's spelling)")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale; default dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--distributed-backend", choices=["auto", "nccl", "gloo"], default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; CPU C++ backend)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None)
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--tokenizer-type", choices=["GPT2BPETokenizer", "SentencePieceTokenizer"], default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None)


def add_distill_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of students / knowledge distillation")
    g.add_argument("--mos", action="store_true", help="distil into a MoE student")
    g.add_argument("--kd", action="store_true", help="distil into a dense student")
    g.add_argument("--load-teacher", default=None, help="teacher checkpoint (root or iter_XXXXXXX)")
    g.add_argument("--num-layers-teacher", type=int, default=None)
    g.add_argument("--hidden-size-teacher", type=int, default=None)
    g.add_argument("--num-attention-heads-teacher", type=int, default=None)
    g.add_argument("--num-experts-teacher", type=int, nargs="+", default=None,
                   help="default: the teacher checkpoint's recorded expert counts")
    g.add_argument("--kd-temp", type=float, default=1.0)
    g.add_argument("--kd-alpha-ce", type=float, default=1.0, help="weight of the LM loss")
    g.add_argument("--kd-beta-ce", type=float, default=1.0, help="weight of the KD term")
    g.add_argument("--mos-kd-stop-iters", type=int, default=None, help="staged KD: teacher off from this step")
    g.add_argument("--mos-kd-stop-tokens", type=int, default=None, help="staged KD: teacher off after these tokens")


def add_checkpoint_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration and optimizer")
    g.add_argument("--reset-iteration", action="store_true",
                   help="load weights (and optimizer unless --no-load-optim) but restart iteration, counters and LR "
                        "schedule")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once this many minutes of wall time have passed since start")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGINT, finish the current step, save, and exit 0 (Megatron-LM)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s per device for MFU (default: measure an fp32 GEMM at start)")


def add_offload_args(p: argparse.ArgumentParser) -> None:
    """NVMe expert offload at inference (tools/generate.py, tools/eval_zeroshot.py): moe.offload.OffloadConfig."""
    g = p.add_argument_group("expert offload")
    g.add_argument("--moe-offload", choices=["none", "nvme"], default="none",
                   help="nvme: keep the experts in an expert store on disk and read them through a cache")
    g.add_argument("--moe-offload-dir", default=None,
                   help="the expert store (tools/offload_experts.py; written from --load when missing or empty)")
    g.add_argument("--moe-expert-cache-bytes", default="25%",
                   help="experts kept resident: a byte size (2GB, 512MiB) or a percentage of all expert bytes")
    g.add_argument("--moe-prefetch", choices=["gate", "none"], default="gate",
                   help="gate: the next MoE layer's router on the current hidden state picks experts to read ahead")
    g.add_argument("--moe-offload-readers", type=int, default=2, help="reader threads (one aio handle each)")
    g.add_argument("--moe-offload-activation-bytes", default="1GiB",
                   help="activation memory of one layer-major block of micro-batches (offline scoring)")
    g.add_argument("--no-moe-offload-layer-major", action="store_true",
                   help="score micro-batches one at a time instead of in layer-major blocks")
    g.add_argument("--stats-json", default=None, help="write the offload statistics (JSON) here")


def offload_config_from_args(args):
    from moe.offload import OffloadConfig

    return _checked(OffloadConfig, mode=args.moe_offload, directory=args.moe_offload_dir,
                    cache_bytes=args.moe_expert_cache_bytes, prefetch=args.moe_prefetch,
                    num_readers=args.moe_offload_readers, activation_bytes=args.moe_offload_activation_bytes,
                    layer_major=not args.no_moe_offload_layer_major)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Megatron-style GPT (MoE) pretraining", allow_abbrev=False)
    add_model_args(p)
    add_moe_args(p)
    add_training_args(p)
    add_data_args(p)
    add_distill_args(p)
    add_checkpoint_logging_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider=None) -> argparse.Namespace:
    p = build_parser()
    if extra_args_provider is not None:
        extra_args_provider(p)
    return p.parse_args(argv)


def _require(args, *names: str) -> None:
    for n in names:
        if getattr(args, n.lstrip("-").replace("-", "_")) is None:
            raise ConfigError(f"{n} is required")


def model_config_from_args(args, padded_vocab_size: int) -> ModelConfig:
    _require(args, "--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length")
    return ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size if args.ffn_hidden_size is not None else 4 * args.hidden_size,
        seq_length=args.seq_length,
        max_position_embeddings=(args.max_position_embeddings if args.max_position_embeddings is not None
                                 else args.seq_length),
        padded_vocab_size=padded_vocab_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        layernorm_epsilon=args.layernorm_epsilon,
        activation="gelu_tanh" if args.bias_gelu_fusion or args.openai_gelu else "gelu",
    )


def moe_config_from_args(args):
    """None for a dense model (--num-experts 1, the Megatron-DeepSpeed default)."""
    if list(args.num_experts) == [1]:
        return None
    from moe.config import MoEConfig

    n_moe = num_moe_layers(args.num_layers, args.expert_interval) if args.num_layers else 0
    if n_moe == 0:
        raise ConfigError(f"--num-experts {args.num_experts} needs at least one MoE layer, but --num-layers "
                          f"({args.num_layers}) // --expert-interval ({args.expert_interval}) is 0")
    for flag, values in (("--num-experts", args.num_experts), ("--moe-expert-parallel-size",
                                                                args.moe_expert_parallel_size)):
        if len(values) not in (1, n_moe):
            raise ConfigError(f"{flag} has {len(values)} values; give one, or one per MoE layer ({n_moe} = "
                              f"--num-layers {args.num_layers} // --expert-interval {args.expert_interval})")
    return _checked(
        MoEConfig,
        num_experts=tuple(args.num_experts),
        expert_interval=args.expert_interval,
        topk=args.topk,
        ep_size=tuple(args.moe_expert_parallel_size),
        train_capacity_factor=args.moe_train_capacity_factor,
        eval_capacity_factor=args.moe_eval_capacity_factor,
        min_capacity=args.moe_min_capacity,
        loss_coeff=args.moe_loss_coeff,
        drop_tokens=not args.disable_moe_token_dropping,
        z_loss_coeff=args.moe_z_loss_coeff,
        noisy_gate_policy=args.moe_noisy_gate_policy,
        use_rts=args.moe_use_rts,
        mlp_type=args.mlp_type,
        drop_policy=args.moe_token_drop_policy,  # None: DeepSpeed's policy for --topk
        second_expert_sampling=args.moe_top2_2nd_expert_sampling,
    )


def tokenizer_config_from_args(args) -> TokenizerConfig:
    return TokenizerConfig(
        tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )


def train_config_from_args(args, padded_vocab_size: int, dp_size: int = 1) -> TrainConfig:
    """Maps every flag onto one dataclass field (tests/unit/test_arguments.py pins the mapping).

    dp_size only sets the default --global-batch-size (micro batch x data-parallel size); `validate` checks it.
    """
    model = model_config_from_args(args, padded_vocab_size)
    mbs = args.micro_batch_size
    gbs = args.global_batch_size if args.global_batch_size is not None else mbs * dp_size
    # Token-based schedule flags are converted to iterations here (the global batch is constant, so the two
    # are equivalent); keeping one unit inside the scheduler keeps resume logic in one place.
    if args.train_iters is not None and args.train_tokens is not None:
        raise ConfigError("--train-iters and --train-tokens are mutually exclusive; give one")
    tokens_per_iter = gbs * args.seq_length
    train_iters = args.train_iters
    if args.train_tokens is not None:
        train_iters = math.ceil(args.train_tokens / tokens_per_iter)
    warmup = args.lr_warmup_iters
    if args.lr_warmup_tokens is not None:
        warmup = math.ceil(args.lr_warmup_tokens / tokens_per_iter)
    decay = args.lr_decay_iters
    if args.lr_decay_tokens is not None:
        decay = math.ceil(args.lr_decay_tokens / tokens_per_iter)
    return TrainConfig(
        model=model,
        moe=moe_config_from_args(args),
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            distributed_backend=args.distributed_backend,
        ),
        optimizer=OptimizerConfig(
            lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
            fp16=args.fp16, bf16=args.bf16, loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
            loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
        ),
        scheduler=SchedulerConfig(
            lr_decay_style=args.lr_decay_style, train_iters=train_iters, lr_warmup_iters=warmup,
            lr_decay_iters=decay,
        ),
        data=DataConfig(
            data_path=tuple(args.data_path or ()), split=args.split, seq_length=args.seq_length,
            micro_batch_size=mbs, global_batch_size=gbs, num_workers=args.num_workers, seed=args.seed,
            data_cache_path=args.data_cache_path, eod_mask_loss=args.eod_mask_loss,
        ),
        tokenizer=tokenizer_config_from_args(args),
        checkpoint=CheckpointConfig(
            save=args.save, load=args.load, save_interval=args.save_interval, no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng, finetune=args.finetune, reset_iteration=args.reset_iteration,
        ),
        distill=_checked(
            DistillConfig, mos=args.mos, kd=args.kd, load_teacher=args.load_teacher,
            num_layers_teacher=args.num_layers_teacher, hidden_size_teacher=args.hidden_size_teacher,
            num_attention_heads_teacher=args.num_attention_heads_teacher,
            num_experts_teacher=tuple(args.num_experts_teacher) if args.num_experts_teacher else None,
            kd_temp=args.kd_temp, kd_alpha_ce=args.kd_alpha_ce, kd_beta_ce=args.kd_beta_ce,
            kd_stop_iters=args.mos_kd_stop_iters, kd_stop_tokens=args.mos_kd_stop_tokens,
        ),
        logging=LoggingConfig(
            log_interval=args.log_interval, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
            exit_interval=args.exit_interval, exit_duration_in_mins=args.exit_duration_in_mins,
            exit_signal_handler=args.exit_signal_handler, tensorboard_dir=args.tensorboard_dir, peak_flops=args.peak_flops,
        ),
        compile=args.compile,
        deterministic=args.deterministic,
    )


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Checks that span several concerns; runs before any group or module is built."""
    tp = cfg.parallel.tensor_model_parallel_size
    dp = parallel_state.validate_sizes(world_size, tp, cfg.moe.ep_size if cfg.moe is not None else (1,))
    d = cfg.data
    if d.global_batch_size % (d.micro_batch_size * dp) != 0:
        raise ConfigError(f"--global-batch-size ({d.global_batch_size}) must be divisible by "
                          f"--micro-batch-size ({d.micro_batch_size}) x data-parallel size ({dp})")
    m = cfg.model
    for value, flag in ((m.num_attention_heads, "--num-attention-heads"), (m.ffn_hidden_size, "--ffn-hidden-size"),
                        (m.padded_vocab_size, "padded vocabulary size")):
        if value % tp != 0:
            raise ConfigError(f"{flag} ({value}) must be divisible by --tensor-model-parallel-size ({tp})")
    if cfg.distill.enabled:
        _checked(validate_distill, cfg.distill, cfg.moe.num_experts if cfg.moe is not None else (1,))


def configure(argv: Optional[Sequence[str]], world_size: int) -> Tuple[TrainConfig, object]:
    """pretrain_gpt.py's flags -> (checked TrainConfig, the tokenizer they name). The only args -> config step.

    The tokenizer is built here because its vocabulary size, padded for --make-vocab-size-divisible-by and the
    tensor-parallel size, is part of the model config (Megatron pads it the same way while parsing).
    """
    from megatron.tokenizer import build_tokenizer, pad_vocab_size

    args = parse_args(argv)
    tok = tokenizer_config_from_args(args)
    tokenizer = build_tokenizer(tok.tokenizer_type, vocab_file=tok.vocab_file, merge_file=tok.merge_file,
                                tokenizer_model=tok.tokenizer_model)
    tp = args.tensor_model_parallel_size
    padded = pad_vocab_size(tokenizer.vocab_size, tok.make_vocab_size_divisible_by, tp)  # checks TP >= 1
    cfg = train_config_from_args(args, padded, dp_size=max(world_size // tp, 1))  # validate checks world % TP
    validate(cfg, world_size)
    return cfg, tokenizer
