"""DeepSpeed's legacy sequence-length curriculum: the scheduled length of each iteration, and the batch cut to it."""
from __future__ import annotations

import math

import torch

from megatron.config import CurriculumConfig


def scheduled_seqlen(cfg: CurriculumConfig, global_step: int) -> int:
    """The difficulty (sequence length) of 1-based iteration `global_step`, as
    deepspeed/runtime/data_pipeline/curriculum_scheduler.py computes it (the engine asks for global_steps + 1):

        fixed_root:   d = floor((step / total_curriculum_step) ** (1 / root_degree) * (max - min) + min),
                      rounded down to a multiple of difficulty_step, at least the first multiple of it >= min,
                      at most max
        fixed_linear: fixed_root with root_degree 1
        fixed_discrete: difficulty[i] for the first max_step[i] >= step, else the last difficulty
    It only grows, so it is a pure function of the iteration: a resumed run schedules exactly as an uninterrupted one.
    """
    if cfg.schedule_type == "fixed_discrete":
        for d, last in zip(cfg.difficulty, cfg.max_step):
            if global_step <= last:
                return d
        return cfg.difficulty[-1]
    degree = 1 if cfg.schedule_type == "fixed_linear" else cfg.root_degree
    frac = (float(global_step) / cfg.total_curriculum_step) ** (1.0 / degree)
    d = math.floor(frac * (cfg.max_difficulty - cfg.min_difficulty) + cfg.min_difficulty)
    step = cfg.difficulty_step
    d -= d % step
    d = max(d, -(-cfg.min_difficulty // step) * step)
    return min(d, cfg.max_difficulty)


def truncate(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, seqlen: int):
    """[b, s] -> [b, seqlen] each (Megatron-DeepSpeed cuts input ids, labels and the loss mask the same way)."""
    if seqlen >= tokens.shape[1]:
        return tokens, labels, loss_mask
    return (tokens[:, :seqlen].contiguous(), labels[:, :seqlen].contiguous(), loss_mask[:, :seqlen].contiguous())
