"""The training loop's mutable state (TrainState) and the plain snapshot of its counters (Progress) that logging
and the exit guards read."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from megatron import parallel_state
from megatron.config import TrainConfig
from megatron.curriculum import scheduled_seqlen
from megatron.microbatches import global_batch_size_at
from megatron.optimizer import MegatronOptimizer, OptimizerParamScheduler


class Progress(NamedTuple):
    """The counters after `iteration` optimizer steps."""

    iteration: int
    consumed_samples: int
    consumed_tokens: int


@dataclass
class TrainState:
    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    loss_scaler: Optional[object]
    groups: parallel_state.ParallelGroups
    device: torch.device
    tokenizer: Optional[object] = None
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    writer: Optional[object] = None
    peak_flops: Optional[float] = None
    teacher: Optional[object] = None  # moe.distill.TeacherRunner while distilling (MoS / KD)
    timers: dict = field(default_factory=dict)  # phase -> seconds summed since the last log line
    checkpoints: Optional[object] = None  # megatron.checkpointing.CheckpointManager (--save, --async-save)
    pipeline: Optional[object] = None  # megatron.pipeline.Pipeline at --pipeline-model-parallel-size > 1
    # what the run holds outside its memory (the offload store's lock): closed by main() or on a failure
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def progress(self) -> Progress:
        return Progress(self.iteration, self.consumed_samples, self.consumed_tokens)

    @property
    def global_batch_size(self) -> int:
        """The global batch of the next step (grows under --rampup-batch-size)."""
        return global_batch_size_at(self.consumed_samples, self.cfg.data)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.cfg.data.micro_batch_size * self.groups.dp_size)

    @property
    def seq_length(self) -> int:
        """Tokens per sample of the next step: the scheduled length under a seqlen curriculum."""
        cur = self.cfg.curriculum
        return self.cfg.data.seq_length if cur is None else min(scheduled_seqlen(cur, self.iteration + 1),
                                                                  self.cfg.data.seq_length)

    def done(self) -> bool:
        """--train-iters reached, or --train-tokens consumed (Megatron-DeepSpeed stops at whichever comes first)."""
        sc = self.cfg.scheduler
        return self.iteration >= sc.train_iters or (sc.train_tokens is not None
                                                    and self.consumed_tokens >= sc.train_tokens)


@contextlib.contextmanager
def closed_on_error(resources: contextlib.ExitStack):
    """An error inside closes `resources` (an offload store's lock), so that the offload directory is free for the
    next run in this process (tests, tools calling main twice); the process exiting would release it too."""
    try:
        yield
    except BaseException:
        resources.close()
        raise
