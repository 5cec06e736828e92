"""Megatron's learning-rate schedule: linear warmup, then constant/linear/cosine decay to min_lr."""
import math

from megatron.config import OptimizerConfig, SchedulerConfig


class OptimizerParamScheduler:
    def __init__(self, optimizer, opt_cfg: OptimizerConfig, cfg: SchedulerConfig):
        self.optimizer = optimizer
        self.max_lr = opt_cfg.lr
        self.min_lr = opt_cfg.min_lr
        self.style = cfg.lr_decay_style
        self.warmup_steps = cfg.lr_warmup_iters
        self.decay_steps = cfg.decay_iters  # >= warmup_steps: SchedulerConfig checks it
        self.num_steps = 0
        self.step(0)

    def get_lr(self) -> float:
        n = self.num_steps
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

    def step(self, increment: int = 1) -> float:
        self.num_steps += increment
        lr = self.get_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps, "decay_style": self.style}

    def load_state_dict(self, sd: dict) -> None:
        # Flags win over the checkpoint for the schedule's shape (Megatron's override behaviour); the step
        # count is what resumes.
        self.num_steps = int(sd["num_steps"])
        self.step(0)
