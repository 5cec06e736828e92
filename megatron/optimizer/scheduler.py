"""Megatron's learning-rate schedule: linear warmup, then constant/linear/cosine decay to min_lr, counted in
iterations, samples or consumed tokens (Megatron-DeepSpeed's OptimizerParamScheduler)."""
import math
from typing import Optional

from megatron.config import OptimizerConfig, SchedulerConfig
from megatron.errors import CheckpointError, ConfigError


class OptimizerParamScheduler:
    """Sets the LR of every param group after each optimizer update.

    Units, as Megatron-DeepSpeed: iteration-based training counts optimizer updates (`num_steps`, the same as
    Megatron's samples / global batch when the batch is constant); sample-based training (--train-samples) counts
    samples (`num_samples`, which grows by the current global batch, so a batch-size ramp-up is followed); when
    --lr-warmup-tokens / --lr-decay-tokens are given, warmup / decay follow `num_tokens`, the tokens consumed
    *before* the update (Megatron reads args.consumed_train_tokens, which the loop advances after the step; under
    a seqlen curriculum these are the truncated tokens). A step skipped for an fp16 overflow advances nothing.
    """

    def __init__(self, optimizer, opt_cfg: OptimizerConfig, cfg: SchedulerConfig):
        self.optimizer = optimizer
        self.max_lr = opt_cfg.lr
        self.min_lr = opt_cfg.min_lr
        self.style = cfg.lr_decay_style
        self.sample_based = cfg.sample_based
        if self.sample_based:
            self.warmup_steps = cfg.lr_warmup_samples
            self.decay_steps = cfg.lr_decay_samples if cfg.lr_decay_samples is not None else cfg.train_samples
        else:
            self.warmup_steps = cfg.lr_warmup_iters
            self.decay_steps = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.train_iters
        self.warmup_tokens: Optional[int] = cfg.lr_warmup_tokens
        self.decay_tokens: Optional[int] = cfg.lr_decay_tokens
        self.override = cfg.override_opt_param_scheduler
        self.use_checkpoint = cfg.use_checkpoint_opt_param_scheduler
        self.num_steps = 0  # optimizer updates
        self.num_samples = 0  # samples of those updates
        self.num_tokens = 0  # tokens consumed before the latest update
        self.step(0)

    @property
    def _progress(self) -> int:
        return self.num_samples if self.sample_based else self.num_steps

    def get_lr(self) -> float:
        n = self._progress
        if self.warmup_tokens is None:
            if self.warmup_steps > 0 and n <= self.warmup_steps:
                if n == self.warmup_steps and self.decay_tokens is not None:
                    # step/sample-wise warmup + token-wise decay: the decay starts from the tokens seen by then
                    self.warmup_tokens = self.num_tokens
                return self.max_lr * n / self.warmup_steps
        elif self.warmup_tokens > 0 and self.num_tokens <= self.warmup_tokens:
            return self.max_lr * self.num_tokens / self.warmup_tokens
        if self.style == "constant":
            return self.max_lr
        if self.decay_tokens is None:
            if n > self.decay_steps:
                return self.min_lr
            span = self.decay_steps - self.warmup_steps
            ratio = (n - self.warmup_steps) / span if span > 0 else 1.0
        else:
            if self.num_tokens > self.decay_tokens:
                return self.min_lr
            start = self.warmup_tokens or 0
            span = self.decay_tokens - start
            ratio = (self.num_tokens - start) / span if span > 0 else 1.0
        ratio = min(max(ratio, 0.0), 1.0)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int = 1, samples: int = 0, tokens: Optional[int] = None) -> float:
        """One optimizer update (`increment` 0 only re-applies the LR): `samples` in it, `tokens` consumed before
        it (all ranks). Returns the LR now set."""
        self.num_steps += increment
        self.num_samples += samples
        if tokens is not None:
            self.num_tokens = tokens
        lr = self.get_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    # Schedule values a checkpoint records; on resume they must match the flags unless one of
    # --override-opt_param-scheduler (flags win) / --use-checkpoint-opt_param-scheduler (checkpoint wins) is given.
    _SHAPE = (("max_lr", "--lr"), ("min_lr", "--min-lr"), ("warmup_steps", "--lr-warmup-iters/--lr-warmup-samples"),
              ("decay_steps", "--lr-decay-iters/--lr-decay-samples (default: the training length)"),
              ("decay_style", "--lr-decay-style"), ("warmup_tokens", "--lr-warmup-tokens"),
              ("decay_tokens", "--lr-decay-tokens"))

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "num_samples": self.num_samples, "num_tokens": self.num_tokens,
                "max_lr": self.max_lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "decay_style": self.style, "warmup_tokens": self.warmup_tokens,
                "decay_tokens": self.decay_tokens, "sample_based": self.sample_based}

    def load_state_dict(self, sd: dict) -> None:
        """Restores the progress counters; the schedule's shape follows Megatron: it must equal the checkpoint's
        (CheckpointError naming the flag), unless overridden either way."""
        for key, flag in self._SHAPE:
            if key not in sd or sd.get("sample_based", False) != self.sample_based and key.endswith("steps"):
                continue  # older checkpoints lack the token fields; iters vs samples are not comparable
            mine, theirs = getattr(self, "style" if key == "decay_style" else key), sd[key]
            if key == "warmup_tokens" and mine is None and self.decay_tokens is not None:
                self.warmup_tokens = theirs  # filled in at the end of a step-wise warmup: state, not a flag
                continue
            if self.override or mine == theirs:
                continue
            if self.use_checkpoint:
                setattr(self, "style" if key == "decay_style" else key, theirs)
                continue
            raise CheckpointError(f"{flag} gives {mine!r} but the checkpoint's LR schedule has {theirs!r}; pass "
                                  f"--override-opt_param-scheduler to use the flags or "
                                  f"--use-checkpoint-opt_param-scheduler to keep the checkpoint's (Megatron)")
        self.num_steps = int(sd["num_steps"])
        self.num_samples = int(sd.get("num_samples", 0))
        self.num_tokens = int(sd.get("num_tokens", 0))
        self.step(0)
