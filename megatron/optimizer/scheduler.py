"""The learning-rate schedule: Megatron's warmup + constant/linear/cosine decay (counted in iterations, samples or
consumed tokens, as Megatron-DeepSpeed's OptimizerParamScheduler), and DeepSpeed's LR range test and OneCycle (with
Adam beta1 cycling), functions of the optimizer steps done."""
import math
from typing import Optional

from megatron.config import OptimizerConfig, SchedulerConfig
from megatron.errors import CheckpointError


class OptimizerParamScheduler:
    """Sets the LR of every param group after each optimizer update.

    Units, as Megatron-DeepSpeed: iteration-based training counts optimizer updates (`num_steps`, the same as
    Megatron's samples / global batch when the batch is constant); sample-based training (--train-samples) counts
    samples (`num_samples`, which grows by the current global batch, so a batch-size ramp-up is followed); when
    --lr-warmup-tokens / --lr-decay-tokens are given, warmup / decay follow `num_tokens`, the tokens consumed
    *before* the update (Megatron reads args.consumed_train_tokens, which the loop advances after the step; under
    a seqlen curriculum these are the truncated tokens). A step skipped for an fp16 overflow advances nothing.


    LR range test and one-cycle: `num_steps` = optimizer steps done; `get_lr()` is the LR of the step about to run. DeepSpeed's schedulers count
    `last_batch_iteration` = steps done - 1 and evaluate their formulas at `last_batch_iteration + 1`, so with
    k = num_steps our values are theirs after k calls of their step(). One difference: DeepSpeed's OneCycle sets
    beta1 to cycle_min_mom before the first step (and beta2 to 0.99 throughout); here beta1 follows the formula from
    step 0 (cycle_max_mom, as every later cycle end) and beta2 stays --adam-beta2.
    """

    def __init__(self, optimizer, opt_cfg: OptimizerConfig, cfg: SchedulerConfig):
        self.optimizer = optimizer
        self.cfg = cfg
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
        if self.style == "lr-range-test":
            return lr_range_test_lr(self.cfg, self.num_steps)
        if self.style == "one-cycle":
            # --lr-warmup-iters (an addition to DeepSpeed's OneCycle, which starts at cycle_min_lr): the cycle's LR
            # times steps / warmup over the first steps, as Megatron's warmup (0 for the first update). Without it
            # the first Adam updates run at cycle_min_lr; in the CPU study that blew up some seeds around step 10
            # (loss back to ~9, a gradient spike of 10-240x the clip in the first layers; docs/study_notes.md)
            lr = one_cycle_lr(self.cfg, self.num_steps)
            if self.warmup_steps > 0 and self.num_steps < self.warmup_steps:
                lr *= self.num_steps / self.warmup_steps
            return lr
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

    def get_momentum(self) -> Optional[float]:
        """Adam's beta1 for the next step under one-cycle with momentum cycling; None when the schedule leaves it."""
        if self.style == "one-cycle" and self.cfg.cycle_momentum:
            return one_cycle_momentum(self.cfg, self.num_steps)
        return None

    def step(self, increment: int = 1, samples: int = 0, tokens: Optional[int] = None) -> float:
        """One optimizer update (`increment` 0 only re-applies the LR): `samples` in it, `tokens` consumed before
        it (all ranks). Returns the LR now set."""
        self.num_steps += increment
        self.num_samples += samples
        if tokens is not None:
            self.num_tokens = tokens
        lr = self.get_lr()
        beta1 = self.get_momentum()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if beta1 is not None:
                g["betas"] = (beta1, g["betas"][1])
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


def lr_range_test_lr(cfg: SchedulerConfig, k: int) -> float:
    """DeepSpeed LRRangeTest after k steps: min_lr * (1 + step_rate * interval), interval = k / step_size
    (floored in staircase mode)."""
    interval = k / cfg.lr_range_test_step_size
    if cfg.lr_range_test_staircase:
        interval = math.floor(interval)
    return cfg.lr_range_test_min_lr * (1 + cfg.lr_range_test_step_rate * interval)


def _one_cycle_scale(cfg: SchedulerConfig, k: int) -> float:
    """DeepSpeed OneCycle's scale factor in [0, 1] at step k <= the cycle length: rises linearly over the first
    half, falls over the second; with a stair count > 0 it is floored to that many levels per half, computed from
    the integer step offset (DeepSpeed's rule, so the peak is not lost to float rounding)."""
    first = float(cfg.cycle_first_step_size)
    second = float(cfg.cycle_second_step_size if cfg.cycle_second_step_size is not None else first)
    total = first + second
    ratio = first / total
    cycle = math.floor(1 + k / total)
    x = 1.0 + k / total - cycle
    if x <= ratio:
        scale, stairs = x / ratio, cfg.cycle_first_stair_count
    else:
        scale = (x - 1) / (ratio - 1)
        stairs = (cfg.cycle_second_stair_count if cfg.cycle_second_stair_count is not None
                  else cfg.cycle_first_stair_count)
    if stairs > 0:
        pos = k % total
        position = pos * stairs / first if pos <= first else (total - pos) * stairs / second
        scale = math.floor(position) / stairs
    return scale


def _cycle_length(cfg: SchedulerConfig) -> int:
    second = cfg.cycle_second_step_size if cfg.cycle_second_step_size is not None else cfg.cycle_first_step_size
    return cfg.cycle_first_step_size + second


def one_cycle_lr(cfg: SchedulerConfig, k: int) -> float:
    """DeepSpeed OneCycle's LR after k steps: the cycle up to k = its length, then cycle_min_lr decayed as
    cycle_min_lr / (1 + decay_lr_rate * (k - length) / decay_step_size) (no decay when either is 0)."""
    total = _cycle_length(cfg)
    if k <= total:
        return cfg.cycle_min_lr + (cfg.cycle_max_lr - cfg.cycle_min_lr) * _one_cycle_scale(cfg, k)
    if cfg.decay_step_size == 0 or cfg.decay_lr_rate == 0:
        return cfg.cycle_min_lr
    return cfg.cycle_min_lr / (1 + cfg.decay_lr_rate * (k - total) / cfg.decay_step_size)


def one_cycle_momentum(cfg: SchedulerConfig, k: int) -> float:
    """DeepSpeed OneCycle's beta1 after k steps: cycle_max_mom - (max - min) * scale over the cycle, then
    cycle_max_mom * (1 + decay_mom_rate * (k - length) / decay_step_size) (no decay when either is 0)."""
    total = _cycle_length(cfg)
    if k <= total:
        return cfg.cycle_max_mom - (cfg.cycle_max_mom - cfg.cycle_min_mom) * _one_cycle_scale(cfg, k)
    if cfg.decay_step_size == 0 or cfg.decay_mom_rate == 0:
        return cfg.cycle_max_mom
    return cfg.cycle_max_mom * (1 + cfg.decay_mom_rate * (k - total) / cfg.decay_step_size)
