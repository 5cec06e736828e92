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
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0  # RoPE theta
    layernorm_epsilon: float = 1e-5  # LayerNorm eps
    activation: str = "gelu_tanh"  # MLP (and expert) activation: 'gelu_tanh' (Megatron's fused bias-GeLU) or 'gelu'

    def __post_init__(self):
        checks = [
            (self.num_layers > 0, f"--num-layers ({self.num_layers}) must be positive"),
            (self.hidden_size > 0, f"--hidden-size ({self.hidden_size}) must be positive"),
            (self.num_attention_heads > 0,
             f"--num-attention-heads ({self.num_attention_heads}) must be positive"),
            (self.hidden_size % max(self.num_attention_heads, 1) == 0,
             f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
             f"({self.num_attention_heads})"),
            (self.seq_length > 0, f"--seq-length ({self.seq_length}) must be positive"),
            (self.position_embedding_type == "rope" or self.max_position_embeddings >= self.seq_length,
             f"--max-position-embeddings ({self.max_position_embeddings}) must be >= --seq-length "
             f"({self.seq_length})"),
            (0.0 <= self.hidden_dropout < 1.0, f"--hidden-dropout ({self.hidden_dropout}) must be in [0, 1)"),
            (0.0 <= self.attention_dropout < 1.0,
             f"--attention-dropout ({self.attention_dropout}) must be in [0, 1)"),
            (self.position_embedding_type in ("learned_absolute", "rope"),
             f"--position-embedding-type ({self.position_embedding_type}) must be learned_absolute or rope"),
            (self.position_embedding_type != "rope" or (self.hidden_size // max(self.num_attention_heads, 1)) % 2 == 0,
             f"--position-embedding-type rope needs an even head dim (got {self.hidden_size} / "
             f"{self.num_attention_heads} = {self.hidden_size // max(self.num_attention_heads, 1)})"),
            (self.activation in ("gelu_tanh", "gelu"),
             f"ModelConfig.activation ({self.activation!r}) must be 'gelu_tanh' or 'gelu' (--no-bias-gelu-fusion)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @classmethod
    def from_recorded(cls, recorded: dict, **overrides) -> "ModelConfig":
        """The config a checkpoint recorded (dataclasses.asdict), with `overrides` applied; fields this version does
        not know (e.g. ones removed since the checkpoint was written) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in recorded.items() if k in known}, **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # TP degree
    distributed_backend: str = "auto"  # nccl on GPU, gloo on CPU

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1:
            raise ConfigError(f"--tensor-model-parallel-size ({self.tensor_model_parallel_size}) must be >= 1")


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

    def __post_init__(self):
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are mutually exclusive; pick one")
        if self.lr < 0 or self.min_lr < 0:
            raise ConfigError(f"--lr ({self.lr}) and --min-lr ({self.min_lr}) must be >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must be <= --lr ({self.lr})")
        if self.clip_grad < 0:
            raise ConfigError(f"--clip-grad ({self.clip_grad}) must be >= 0")


@dataclass(frozen=True)
class SchedulerConfig:
    lr_decay_style: str = "linear"  # constant | linear | cosine
    # --train-tokens / --lr-warmup-tokens / --lr-decay-tokens are converted to these step counts by arguments.py
    # (the global batch is constant, so tokens and steps are equivalent)
    train_iters: Optional[int] = None  # total optimizer steps (required)
    lr_warmup_iters: int = 0  # warmup steps
    lr_decay_iters: Optional[int] = None  # decay horizon in steps (default train_iters)

    def __post_init__(self):
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError(f"--lr-decay-style ({self.lr_decay_style}) must be constant, linear or cosine")
        if self.train_iters is None:
            raise ConfigError("one of --train-iters or --train-tokens is required")
        if self.train_iters < 0:
            raise ConfigError(f"--train-iters ({self.train_iters}) must be >= 0")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters ({self.lr_warmup_iters}) must be >= 0")
        if self.decay_iters < self.lr_warmup_iters:
            raise ConfigError(f"--lr-decay-iters ({self.decay_iters}) must be >= --lr-warmup-iters "
                              f"({self.lr_warmup_iters})")

    @property
    def decay_iters(self) -> int:
        """The decay horizon in steps: --lr-decay-iters, or --train-iters when not given."""
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters


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

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size ({self.micro_batch_size}) must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"--global-batch-size ({self.global_batch_size}) must be >= 1")


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

    def __post_init__(self):
        for name, v in (("--log-interval", self.log_interval), ("--eval-interval", self.eval_interval)):
            if v <= 0:
                raise ConfigError(f"{name} ({v}) must be positive")
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters ({self.eval_iters}) must be >= 0")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(f"--exit-duration-in-mins ({self.exit_duration_in_mins}) must be > 0")


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
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms


def num_moe_layers(num_layers: int, expert_interval: int) -> int:
    """MoE layers under the Megatron-DeepSpeed convention: layer i (0-based) is MoE iff (i+1) % interval == 0."""
    return num_layers // expert_interval


def is_moe_layer(layer_idx: int, expert_interval: int) -> bool:
    return (layer_idx + 1) % expert_interval == 0
