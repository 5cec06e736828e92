"""The learning-rate schedule: Megatron's warmup + constant/linear/cosine decay, and DeepSpeed's LR range test and
OneCycle (with Adam beta1 cycling), all as functions of one counter, the optimizer steps done."""
import math
from typing import Optional

from megatron.config import OptimizerConfig, SchedulerConfig


class OptimizerParamScheduler:
    """Sets every param group's LR (and, for one-cycle with momentum, Adam's beta1) for the next step.

    `num_steps` = optimizer steps done; `get_lr()` is the LR of the step about to run. DeepSpeed's schedulers count
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
        self.warmup_steps = cfg.lr_warmup_iters
        self.decay_steps = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.train_iters
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            raise ValueError(f"--lr-decay-iters ({self.decay_steps}) must be >= --lr-warmup-iters "
                             f"({self.warmup_steps})")
        self.num_steps = 0
        self.step(0)

    def get_lr(self) -> float:
        n = self.num_steps
        if self.style == "lr-range-test":
            return lr_range_test_lr(self.cfg, n)
        if self.style == "one-cycle":
            return one_cycle_lr(self.cfg, n)
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.max_lr * n / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        if n > self.decay_steps:
            return self.min_lr
        span = self.decay_steps - self.warmup_steps
        ratio = (n - self.warmup_steps) / span if span > 0 else 1.0
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

    def step(self, increment: int = 1) -> float:
        self.num_steps += increment
        lr = self.get_lr()
        beta1 = self.get_momentum()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if beta1 is not None:
                g["betas"] = (beta1, g["betas"][1])
        return lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps, "decay_style": self.style}

    def load_state_dict(self, sd: dict) -> None:
        # Flags win over the checkpoint for the schedule's shape (Megatron's override behaviour); the step
        # count is what resumes, and LR and beta1 are functions of it alone, so resume is exact.
        self.num_steps = int(sd["num_steps"])
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
