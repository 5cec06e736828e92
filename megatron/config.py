"""Frozen configuration dataclasses, one per concern, grouped in TrainConfig (built by arguments.py).

Each `__post_init__` checks its own concern and raises ConfigError naming the flag; checks that span several
concerns are in `megatron.arguments.validate`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from megatron.errors import ConfigError
from moe.config import MoEConfig
from moe.distill import DistillConfig
from moe.offload.config import OptimizerOffloadConfig


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int  # transformer blocks
    hidden_size: int  # model width h
    num_attention_heads: int  # attention heads; must divide hidden_size
    ffn_hidden_size: int  # dense MLP inner width (default 4h)
    seq_length: int  # training sequence length (tokens)
    max_position_embeddings: int  # size of the learned position table (>= seq_length)
    padded_vocab_size: int  # vocabulary rows after Megatron padding
    hidden_dropout: float = 0.1  # dropout after attention/MLP output projections
    attention_dropout: float = 0.1  # dropout on attention probabilities
    init_method_std: float = 0.02  # std of normal init; output projections use std/sqrt(2*layers)
    position_embedding_type: str = "learned_absolute"  # "learned_absolute", "rope" or "none"
    rotary_base: float = 10000.0  # RoPE theta
    layernorm_epsilon: float = 1e-5  # eps of every normalisation layer (--layernorm-epsilon / --norm-epsilon)
    activation: str = "gelu_tanh"  # MLP (and expert) activation: 'gelu_tanh' (Megatron's fused bias-GeLU), 'gelu',
    #   or 'swiglu' (silu(x W_gate) * x W_up: the first projection holds [gate; up], 2 x ffn rows)
    # --- block architecture (Megatron-LM core's flags; the defaults are the GPT-3 block) ---
    normalization: str = "LayerNorm"  # "LayerNorm" or "RMSNorm" (every norm of the model)
    num_query_groups: Optional[int] = None  # grouped-query attention: key/value heads; None = one per head (MHA)
    kv_channels: Optional[int] = None  # head dim of q, k, v; None = hidden_size / num_attention_heads
    qk_layernorm: bool = False  # norm over each head's q and k before RoPE (Qwen3); with MLA: the latents' norms
    rotary_percent: float = 1.0  # fraction of each head's dims that RoPE rotates (the first ones), in (0, 1]
    add_bias_linear: bool = True  # biases in attention and MLP/expert linears (--disable-bias-linear: False)
    add_qkv_bias: bool = False  # biases on the q/k/v projection even without add_bias_linear (--add-qkv-bias; Qwen2)
    qk_layernorm_full: bool = False  # with qk_layernorm: one norm over all heads' q (and k) together, not per head
    #   (OLMoE's q_norm/k_norm over the whole projection); TP 1 only
    untie_embeddings_and_output_weights: bool = False  # the LM head has its own [V, h] weight
    multi_latent_attention: bool = False  # DeepSeek-V2/V3 MLA instead of (GQA) self-attention
    q_lora_rank: Optional[int] = None  # MLA: rank of the query down-projection; None = a full-rank q projection
    kv_lora_rank: int = 32  # MLA: rank of the joint key/value latent
    qk_head_dim: int = 128  # MLA: per-head q/k dims without position information (Megatron's qk_head_dim)
    qk_pos_emb_head_dim: int = 64  # MLA: per-head q/k dims that carry RoPE (shared by all heads for k)
    v_head_dim: int = 128  # MLA: per-head value dim
    recompute_granularity: Optional[str] = None  # activation recomputation: None | "full" | "selective"
    recompute_method: Optional[str] = None  # full recompute: "uniform" | "block"
    recompute_num_layers: Optional[int] = None  # layers per recomputed chunk (uniform) or recomputed (block)

    def __post_init__(self):
        checks = [
            (self.num_layers > 0, f"--num-layers ({self.num_layers}) must be positive"),
            (self.hidden_size > 0, f"--hidden-size ({self.hidden_size}) must be positive"),
            (self.num_attention_heads > 0,
             f"--num-attention-heads ({self.num_attention_heads}) must be positive"),
            (self.kv_channels is not None or self.multi_latent_attention
             or self.hidden_size % max(self.num_attention_heads, 1) == 0,
             f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
             f"({self.num_attention_heads}) (or give --kv-channels)"),
            (self.seq_length > 0, f"--seq-length ({self.seq_length}) must be positive"),
            (self.position_embedding_type != "learned_absolute" or self.max_position_embeddings >= self.seq_length,
             f"--max-position-embeddings ({self.max_position_embeddings}) must be >= --seq-length "
             f"({self.seq_length})"),
            (0.0 <= self.hidden_dropout < 1.0, f"--hidden-dropout ({self.hidden_dropout}) must be in [0, 1)"),
            (0.0 <= self.attention_dropout < 1.0,
             f"--attention-dropout ({self.attention_dropout}) must be in [0, 1)"),
            (self.position_embedding_type in ("learned_absolute", "rope", "none"),
             f"--position-embedding-type ({self.position_embedding_type}) must be learned_absolute, rope or none"),
            (self.activation in ("gelu_tanh", "gelu", "swiglu"),
             f"ModelConfig.activation ({self.activation!r}) must be 'gelu_tanh', 'gelu' (--no-bias-gelu-fusion) or "
             f"'swiglu' (--swiglu)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        self._check_attention()
        self._check_recompute()

    def _check_attention(self) -> None:
        """Norm kind, GQA groups, head dims, RoPE fraction and MLA sizes (TP divisibility: arguments.validate)."""
        heads, groups = self.num_attention_heads, self.num_query_groups
        checks = [
            (self.normalization in ("LayerNorm", "RMSNorm"),
             f"--normalization ({self.normalization}) must be LayerNorm or RMSNorm"),
            (self.layernorm_epsilon > 0, f"--norm-epsilon ({self.layernorm_epsilon}) must be > 0"),
            (groups is None or (groups >= 1 and heads % groups == 0),
             f"--num-query-groups ({groups}) must divide --num-attention-heads ({heads}); pick a divisor of {heads}"),
            (self.kv_channels is None or self.kv_channels >= 1, f"--kv-channels ({self.kv_channels}) must be >= 1"),
            (not self.qk_layernorm_full or (self.qk_layernorm and not self.multi_latent_attention),
             "--qk-layernorm-full needs --qk-layernorm (and no --multi-latent-attention)"),
            (0.0 < self.rotary_percent <= 1.0, f"--rotary-percent ({self.rotary_percent}) must be in (0, 1]"),
            (not self.multi_latent_attention or groups is None,
             "--multi-latent-attention and --group-query-attention/--num-query-groups do not combine (MLA shares "
             "one latent over all heads); drop one"),
            (not self.multi_latent_attention or self.position_embedding_type == "rope",
             f"--multi-latent-attention needs --position-embedding-type rope (got {self.position_embedding_type})"),
            (not self.multi_latent_attention or min(self.kv_lora_rank, self.qk_head_dim, self.v_head_dim,
                                                    self.qk_pos_emb_head_dim, self.q_lora_rank or 1) >= 1,
             f"--kv-lora-rank ({self.kv_lora_rank}), --q-lora-rank ({self.q_lora_rank}), --qk-head-dim "
             f"({self.qk_head_dim}), --qk-pos-emb-head-dim ({self.qk_pos_emb_head_dim}) and --v-head-dim "
             f"({self.v_head_dim}) must be >= 1"),
            (self.position_embedding_type != "rope" or self.rotary_dim % 2 == 0,
             f"--position-embedding-type rope needs an even head dim (the rotated dims per head: got "
             f"{self.rotary_dim} = {'--qk-pos-emb-head-dim' if self.multi_latent_attention else 'head dim x --rotary-percent'})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def _check_recompute(self) -> None:
        """Megatron-LM's rules: full needs a method and a layer count (uniform: it divides --num-layers; block:
        at most --num-layers); selective recomputes core attention in every layer and ignores both."""
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in (None, "full", "selective"):
            raise ConfigError(f"--recompute-granularity ({g}) must be full or selective")
        if m not in (None, "uniform", "block"):
            raise ConfigError(f"--recompute-method ({m}) must be uniform or block")
        if g is None and (m is not None or n is not None):
            raise ConfigError("--recompute-method/--recompute-num-layers need --recompute-granularity full "
                              "(or use --checkpoint-activations)")
        if g != "full":
            return
        if m is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
        if n is None or n < 1:
            raise ConfigError(f"--recompute-granularity full needs --recompute-num-layers >= 1 (got {n})")
        if m == "uniform" and self.num_layers % n != 0:
            raise ConfigError(f"--recompute-num-layers ({n}) must divide --num-layers ({self.num_layers}) with "
                              f"--recompute-method uniform (each chunk of that many layers is recomputed as one)")
        if m == "block" and n > self.num_layers:
            raise ConfigError(f"--recompute-num-layers ({n}) must be <= --num-layers ({self.num_layers}) with "
                              f"--recompute-method block")

    @classmethod
    def from_recorded(cls, recorded: dict, **overrides) -> "ModelConfig":
        """The config a checkpoint recorded (dataclasses.asdict), with `overrides` applied; fields this version does
        not know (e.g. ones removed since the checkpoint was written) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in recorded.items() if k in known}, **overrides})

    @property
    def head_dim(self) -> int:
        """Per-head q/k/v dim of (GQA) self-attention: --kv-channels, default hidden / heads."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dims per head that RoPE rotates: MLA's --qk-pos-emb-head-dim, else head_dim x --rotary-percent."""
        if self.multi_latent_attention:
            return self.qk_pos_emb_head_dim
        return int(self.head_dim * self.rotary_percent)

    @property
    def query_groups(self) -> int:
        """Key/value heads (--num-query-groups; all heads without GQA)."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # TP degree
    distributed_backend: str = "auto"  # nccl on GPU, gloo on CPU
    zero_stage: int = 0  # ZeRO: 1 shards optimizer state over data-parallel ranks, 2 also gradients
    distributed_timeout_minutes: float = 10  # timeout of every process group (minutes; NCCL's default 10)
    sequence_parallel: bool = False  # --sequence-parallel: norm/dropout regions sharded along the sequence over TP
    context_parallel_size: int = 1  # --context-parallel-size: ranks splitting each sequence for attention (CP)
    expert_tensor_parallel_size: int = 1  # --expert-tensor-parallel-size: ranks splitting each expert's FFN (ETP)
    pipeline_model_parallel_size: int = 1  # --pipeline-model-parallel-size: stages the layers are split over (PP)
    layers_per_virtual_stage: Optional[int] = None  # --num-layers-per-virtual-pipeline-stage: interleaved chunks
    first_stage_layers: Optional[int] = None  # --decoder-first-pipeline-num-layers (uneven first stage)
    last_stage_layers: Optional[int] = None  # --decoder-last-pipeline-num-layers (uneven last stage)
    pipeline_schedule: str = "1f1b"  # --pipeline-schedule: 1f1b or gpipe (virtual stages: interleaved 1F1B)

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1:
            raise ConfigError(f"--tensor-model-parallel-size ({self.tensor_model_parallel_size}) must be >= 1")
        if not self.distributed_timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes ({self.distributed_timeout_minutes}) must be > 0")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"--zero-stage ({self.zero_stage}) must be 0, 1 or 2")
        if self.pipeline_model_parallel_size < 1:
            raise ConfigError(f"--pipeline-model-parallel-size ({self.pipeline_model_parallel_size}) must be >= 1")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # floor of the decay
    weight_decay: float = 0.01  # decoupled (AdamW) weight decay, not applied to biases/norms
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip (0 disables)
    check_for_nan_in_loss_and_grad: bool = True  # bf16/fp32: stop on a NaN/Inf loss or gradient before the step
    fp16: bool = False  # fp16 autocast + dynamic loss scaling
    bf16: bool = False  # bf16 autocast
    loss_scale: Optional[float] = None  # static loss scale for fp16; None = dynamic
    initial_loss_scale: float = 2.0 ** 32  # dynamic scaler start
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000  # good steps before the scale doubles
    hysteresis: int = 2  # overflows tolerated before halving
    overlap_grad_reduce: bool = False  # reduce gradient buckets from hooks during the last micro-batch's backward
    ddp_bucket_size: int = 40_000_000  # elements per bucket under overlap_grad_reduce

    def __post_init__(self):
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are mutually exclusive; pick one")
        if self.lr < 0 or self.min_lr < 0:
            raise ConfigError(f"--lr ({self.lr}) and --min-lr ({self.min_lr}) must be >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must be <= --lr ({self.lr})")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad ({self.clip_grad}) must be >= 0")
        if self.ddp_bucket_size < 1:
            raise ConfigError(f"--ddp-bucket-size ({self.ddp_bucket_size}) must be >= 1 (elements per bucket)")


LR_DECAY_STYLES = ("constant", "linear", "cosine", "lr-range-test", "one-cycle")


@dataclass(frozen=True)
class SchedulerConfig:
    """Megatron's LR schedule. Iteration-based (--train-iters, --lr-warmup/decay-iters) or sample-based
    (--train-samples, --lr-warmup/decay-samples); --lr-warmup/decay-tokens, when given, override either and follow
    the tokens actually consumed (fewer under a seqlen curriculum)."""
    lr_decay_style: str = "linear"  # constant | linear | cosine | lr-range-test | one-cycle
    train_iters: Optional[int] = None  # total optimizer steps (derived from train_samples/train_tokens if not given)
    train_tokens: Optional[int] = None  # also stop once this many tokens were consumed (Megatron-DeepSpeed)
    lr_warmup_iters: int = 0  # warmup steps (iteration-based)
    lr_warmup_tokens: Optional[int] = None  # warmup in consumed tokens (overrides iters/samples)
    lr_decay_iters: Optional[int] = None  # decay horizon in steps (default train_iters)
    lr_decay_tokens: Optional[int] = None  # decay horizon in consumed tokens (overrides iters/samples)
    train_samples: Optional[int] = None  # sample-based training: total samples (all ranks)
    lr_warmup_samples: int = 0  # warmup in samples (sample-based)
    lr_decay_samples: Optional[int] = None  # decay horizon in samples (default train_samples)
    override_opt_param_scheduler: bool = False  # on resume take max/min LR, warmup, decay, style from the flags
    use_checkpoint_opt_param_scheduler: bool = False  # on resume take them from the checkpoint

    # LR range test (DeepSpeed LRRangeTest): lr(k) = min_lr * (1 + step_rate * k / step_size), k = steps done
    lr_range_test_min_lr: float = 1e-3  # LR of the first step
    lr_range_test_step_size: int = 2000  # steps per unit of increase (the LR grows by step_rate x min_lr per this)
    lr_range_test_step_rate: float = 1.0  # growth per step_size steps, in units of min_lr
    lr_range_test_staircase: bool = False  # floor(k / step_size): hold the LR flat within each step_size steps
    # OneCycle (DeepSpeed): min -> max over the first half, max -> min over the second, then decay
    cycle_min_lr: Optional[float] = None  # LR at the start and end of the cycle (required for one-cycle)
    cycle_max_lr: Optional[float] = None  # LR at the peak, after cycle_first_step_size steps (required)
    cycle_first_step_size: int = 2000  # steps of the rising half
    cycle_second_step_size: Optional[int] = None  # steps of the falling half (None: cycle_first_step_size)
    cycle_first_stair_count: int = 0  # > 0: the rising half moves in this many flat stairs
    cycle_second_stair_count: Optional[int] = None  # stairs of the falling half (None: cycle_first_stair_count)
    decay_step_size: int = 0  # after the cycle: steps per unit of decay interval (0 = no decay, stay at min)
    decay_lr_rate: float = 0.0  # after the cycle: lr = cycle_min_lr / (1 + decay_lr_rate * steps / decay_step_size)
    cycle_momentum: bool = True  # cycle Adam's beta1 inversely to the LR (max_mom at min LR, min_mom at the peak)
    cycle_min_mom: float = 0.8  # beta1 at the LR peak
    cycle_max_mom: float = 0.9  # beta1 at the cycle's ends
    decay_mom_rate: float = 0.0  # after the cycle: beta1 = cycle_max_mom * (1 + decay_mom_rate * steps / decay_step_size)


    def __post_init__(self):
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style ({self.lr_decay_style}) must be one of {', '.join(LR_DECAY_STYLES)}")
        if self.train_iters is None:
            raise ConfigError("one of --train-iters, --train-samples or --train-tokens is required")
        if self.train_iters < 0:
            raise ConfigError(f"--train-iters ({self.train_iters}) must be >= 0")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters ({self.lr_warmup_iters}) must be >= 0")
        if self.sample_based:
            decay = self.lr_decay_samples if self.lr_decay_samples is not None else self.train_samples
            if decay < self.lr_warmup_samples:
                raise ConfigError(f"--lr-decay-samples ({decay}) must be >= --lr-warmup-samples "
                                  f"({self.lr_warmup_samples})")
        elif self.decay_iters < self.lr_warmup_iters:
            raise ConfigError(f"--lr-decay-iters ({self.decay_iters}) must be >= --lr-warmup-iters "
                              f"({self.lr_warmup_iters})")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                              "exclusive; pick one")
        style = self.lr_decay_style
        if style == "lr-range-test" and self.lr_warmup_iters > 0:
            raise ConfigError(f"--lr-warmup-iters/--lr-warmup-tokens ({self.lr_warmup_iters} steps) have no effect "
                             f"with --lr-decay-style {style}, which sets the LR from the first step; drop them")
        if style == "one-cycle" and (self.lr_warmup_tokens or self.lr_warmup_samples):
            raise ConfigError("--lr-decay-style one-cycle counts optimizer steps: warm it up with --lr-warmup-iters, "
                              "not --lr-warmup-tokens/--lr-warmup-samples")
        if style == "lr-range-test":
            self._check_lr_range_test()
        if style == "one-cycle":
            self._check_one_cycle()

    @property
    def decay_iters(self) -> int:
        """The decay horizon in steps: --lr-decay-iters, or --train-iters when not given."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    @property
    def sample_based(self) -> bool:
        return self.train_samples is not None

    def _check_lr_range_test(self):
        if not self.lr_range_test_min_lr > 0:
            raise ConfigError(f"--lr-range-test-min-lr ({self.lr_range_test_min_lr}) must be > 0")
        if self.lr_range_test_step_size < 1:
            raise ConfigError(f"--lr-range-test-step-size ({self.lr_range_test_step_size}) must be >= 1")
        if self.lr_range_test_step_rate < 0:
            raise ConfigError(f"--lr-range-test-step-rate ({self.lr_range_test_step_rate}) must be >= 0")

    def _check_one_cycle(self):
        if self.cycle_min_lr is None or self.cycle_max_lr is None:
            raise ConfigError("--lr-decay-style one-cycle needs --cycle-min-lr and --cycle-max-lr (e.g. from "
                             "tools/lr_range_test.py)")
        if not 0 <= self.cycle_min_lr <= self.cycle_max_lr:
            raise ConfigError(f"--cycle-min-lr ({self.cycle_min_lr}) must be in [0, --cycle-max-lr "
                             f"({self.cycle_max_lr})]")
        if self.cycle_first_step_size < 1:
            raise ConfigError(f"--cycle-first-step-size ({self.cycle_first_step_size}) must be >= 1")
        if self.cycle_second_step_size is not None and self.cycle_second_step_size < 0:
            raise ConfigError(f"--cycle-second-step-size ({self.cycle_second_step_size}) must be >= 0")
        for flag, v in (("--cycle-first-stair-count", self.cycle_first_stair_count),
                        ("--cycle-second-stair-count", self.cycle_second_stair_count),
                        ("--decay-step-size", self.decay_step_size)):
            if v is not None and v < 0:
                raise ConfigError(f"{flag} ({v}) must be >= 0")
        if self.cycle_momentum and not 0 <= self.cycle_min_mom <= self.cycle_max_mom < 1:
            raise ConfigError(f"--cycle-min-mom ({self.cycle_min_mom}) and --cycle-max-mom ({self.cycle_max_mom}) must "
                             f"satisfy 0 <= min <= max < 1 (they are Adam's beta1)")


@dataclass(frozen=True)
class DataConfig:
    data_path: Tuple[str, ...] = ()  # prefixes, optionally weighted: ("0.7", "A", "0.3", "B")
    split: str = "969,30,1"  # train,valid,test document split weights
    seq_length: int = 1024  # tokens per sample (labels shifted by one)
    micro_batch_size: int = 1  # samples per forward per rank
    global_batch_size: Optional[int] = None  # samples per optimizer step (all ranks); default mbs*dp
    num_workers: int = 2  # DataLoader workers
    seed: int = 1234  # data shuffle and init seed
    data_cache_path: Optional[str] = None  # where index .npy caches go (default beside the data)
    eod_mask_loss: bool = False  # mask the loss on end-of-document tokens
    rampup_batch_size: Optional[Tuple[int, int, int]] = None  # (start gbs, increment, ramp-up samples), Megatron

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size ({self.micro_batch_size}) must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"--global-batch-size ({self.global_batch_size}) must be >= 1")
        if self.rampup_batch_size is not None:
            start, inc, samples = self.rampup_batch_size
            gbs = self.global_batch_size
            if start < 1 or inc < 1 or samples < 0 or gbs is None or start > gbs or (gbs - start) % inc:
                raise ConfigError(f"--rampup-batch-size {start} {inc} {samples}: needs start >= 1, increment >= 1, "
                                 f"samples >= 0 and (--global-batch-size {gbs} - start) divisible by the increment")


@dataclass(frozen=True)
class CurriculumConfig:
    """DeepSpeed's legacy seqlen curriculum (ds_config "curriculum_learning"): each training batch is cut to the
    scheduled sequence length (difficulty), a function of the iteration."""
    min_difficulty: int  # first sequence length (tokens)
    max_difficulty: int  # final sequence length (tokens), <= --seq-length
    schedule_type: str = "fixed_linear"  # fixed_linear | fixed_root | fixed_discrete
    total_curriculum_step: Optional[int] = None  # iterations from min to max (fixed_linear / fixed_root)
    difficulty_step: int = 8  # every scheduled length is a multiple of this (fixed_linear / fixed_root)
    root_degree: int = 1  # fixed_root: 2 = square root, ...
    difficulty: Tuple[int, ...] = ()  # fixed_discrete: the lengths ...
    max_step: Tuple[int, ...] = ()  # fixed_discrete: ... and the last iteration of each but the final one

    def __post_init__(self):
        where = "--deepspeed_config curriculum_learning"
        if self.schedule_type not in ("fixed_linear", "fixed_root", "fixed_discrete"):
            raise ConfigError(f"{where}.schedule_type ({self.schedule_type}) must be fixed_linear, fixed_root or "
                             f"fixed_discrete")
        if not 1 <= self.min_difficulty <= self.max_difficulty:
            raise ConfigError(f"{where}: needs 1 <= min_difficulty ({self.min_difficulty}) <= max_difficulty "
                             f"({self.max_difficulty})")
        if self.schedule_type == "fixed_discrete":
            if not self.difficulty or len(self.difficulty) != len(self.max_step) + 1:
                raise ConfigError(f"{where}.schedule_config: fixed_discrete needs 'difficulty' with one more entry "
                                 f"than 'max_step' (got {len(self.difficulty)} and {len(self.max_step)})")
        elif self.total_curriculum_step is None or self.total_curriculum_step < 1 or self.difficulty_step < 1:
            raise ConfigError(f"{where}.schedule_config: {self.schedule_type} needs total_curriculum_step >= 1 "
                             f"(got {self.total_curriculum_step}) and difficulty_step >= 1 (got {self.difficulty_step})")


@dataclass(frozen=True)
class TokenizerConfig:
    tokenizer_type: str = "GPT2BPETokenizer"
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    make_vocab_size_divisible_by: int = 128


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None  # directory to write checkpoints to
    load: Optional[str] = None  # directory to resume from
    save_interval: Optional[int] = None  # steps between checkpoints
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False  # load weights only, reset iteration/optimizer/consumed counters
    reset_iteration: bool = False  # load weights (+optimizer) but restart iteration, counters and LR schedule
    load_fallback: bool = False  # a torn/corrupted --load checkpoint: load the newest older one that verifies
    async_save: bool = False  # --async-save: write checkpoints on a background thread from a CPU snapshot

    def __post_init__(self):
        if self.save_interval is not None and self.save_interval <= 0:
            raise ConfigError(f"--save-interval ({self.save_interval}) must be positive")


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 100  # steps between log lines
    eval_interval: int = 1000  # steps between validation runs
    eval_iters: int = 100  # validation micro-batch iterations per rank per evaluation
    exit_interval: Optional[int] = None  # stop (after saving) when iteration % exit_interval == 0
    exit_duration_in_mins: Optional[float] = None  # stop (after saving) once this much wall time has passed
    exit_signal_handler: bool = False  # SIGTERM/SIGINT: finish the step, save, exit 0
    tensorboard_dir: Optional[str] = None
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; measured when None
    tensorboard_queue_size: int = 1000  # TensorBoard events buffered before a write to disk
    log_timers_to_tensorboard: bool = False  # per-phase step times (ms) and iteration time to TensorBoard
    log_batch_size_to_tensorboard: bool = False  # the global batch size (samples) of each logged step
    log_validation_ppl_to_tensorboard: bool = False  # validation perplexity next to the validation loss
    log_optimizer_states_to_tensorboard: bool = False  # L1/L2/abs-max of Adam moments and weights
    wall_clock_breakdown: bool = False  # print the per-phase step times in the log line (ds_config)

    def __post_init__(self):
        for name, v in (("--log-interval", self.log_interval), ("--eval-interval", self.eval_interval)):
            if v <= 0:
                raise ConfigError(f"{name} ({v}) must be positive")
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters ({self.eval_iters}) must be >= 0")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(f"--exit-duration-in-mins ({self.exit_duration_in_mins}) must be > 0")
        if self.tensorboard_queue_size < 1:
            raise ConfigError(f"--tensorboard-queue-size ({self.tensorboard_queue_size}) must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    moe: Optional[MoEConfig]  # None = dense model
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    distill: DistillConfig = field(default_factory=DistillConfig)  # MoS / KD (disabled by default)
    optimizer_offload: OptimizerOffloadConfig = field(default_factory=OptimizerOffloadConfig)  # expert Adam on NVMe
    curriculum: Optional[CurriculumConfig] = None  # seqlen curriculum (ds_config curriculum_learning); None = off
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms
    tf32: bool = True  # fp32 matmuls / cuDNN convolutions on CUDA may use TF32 tensor cores (--no-tf32: IEEE fp32)

