"""Builds every process group once (TP, DP, EP, expert-DP) and returns them as one frozen ParallelGroups."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.errors import ConfigError


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    tp_size: int
    dp_size: int
    tp_group: Optional[object]  # None when world is one process
    dp_group: Optional[object]
    # keyed by EP size: this rank's expert-parallel group and expert-data-parallel group
    ep_groups: Dict[int, Optional[object]] = field(default_factory=dict)
    expert_dp_groups: Dict[int, Optional[object]] = field(default_factory=dict)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def ep_group(self, ep_size: int):
        """This rank's expert-parallel group of `ep_size` ranks (None: one rank, no communication)."""
        return self._built(self.ep_groups, ep_size)

    def expert_dp_group(self, ep_size: int):
        """The ranks holding the same experts as this one under EP size `ep_size` (None: one rank)."""
        return self._built(self.expert_dp_groups, ep_size)

    @staticmethod
    def _built(groups: Dict[int, Optional[object]], ep_size: int):
        if ep_size not in groups:
            raise ValueError(f"--moe-expert-parallel-size {ep_size}: no expert-parallel group of that size was built "
                             f"(built: {sorted(groups)}); include it in parallel_state.initialize(tp, ep_sizes)")
        return groups[ep_size]


def validate_sizes(world_size: int, tp_size: int, ep_sizes: Sequence[int]) -> int:
    """Checks the degrees multiply out (the one home of this check: `arguments.validate` calls it before anything
    is built, `initialize` again for callers that build groups directly); returns the data-parallel size."""
    if world_size % tp_size != 0:
        raise ConfigError(f"world size ({world_size}) must be divisible by --tensor-model-parallel-size ({tp_size}); "
                          f"launch with torchrun --nproc_per_node=<TP x data-parallel size>")
    dp_size = world_size // tp_size
    for ep in ep_sizes:
        if dp_size % ep != 0:
            raise ConfigError(f"--moe-expert-parallel-size ({ep}) must divide the data-parallel size ({dp_size}) = "
                              f"world size ({world_size}) / --tensor-model-parallel-size ({tp_size})")
    return dp_size


def world_size() -> int:
    """The number of processes of this run, known before the process group exists (torchrun's WORLD_SIZE)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str = "auto", timeout_minutes: Optional[float] = None) -> tuple:
    """Initialises torch.distributed from torchrun's env vars when present; returns (rank, world_size, device).
    timeout_minutes: --distributed-timeout-minutes, the timeout of the default group (None: torch's default)."""
    world = world_size()  # already set up by the caller (tests, a user's own launcher), or torchrun's env
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank % max(torch.cuda.device_count(), 1))))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=_timeout(timeout_minutes))
    return rank, world, device


def _timeout(minutes: Optional[float]):
    """--distributed-timeout-minutes as a timedelta (None: torch's default; subgroups do not inherit the default
    group's timeout, so every new_group gets it too, as in Megatron-LM)."""
    return None if minutes is None else datetime.timedelta(minutes=minutes)


def _build_dp_groups(world_size: int, tp_size: int, rank: int, timeout=None):
    """DP groups: ranks sharing a TP rank (stride tp_size). Every rank creates every group (collective)."""
    mine = None
    for tp_rank in range(tp_size):
        ranks = list(range(tp_rank, world_size, tp_size))
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


def _build_tp_groups(world_size: int, tp_size: int, rank: int, timeout=None):
    mine = None
    for start in range(0, world_size, tp_size):
        ranks = list(range(start, start + tp_size))
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


def _build_expert_groups(world_size: int, tp_size: int, ep_size: int, rank: int, timeout=None):
    """EP groups: consecutive chunks of ep_size within each DP group; expert-DP: same slot across chunks.

    Example world 8, tp 1, ep 4: EP {0..3},{4..7}; expert-DP {0,4},{1,5},{2,6},{3,7}.
    """
    dp_size = world_size // tp_size
    ep_mine = edp_mine = None
    for tp_rank in range(tp_size):
        dp_ranks = list(range(tp_rank, world_size, tp_size))
        for c in range(0, dp_size, ep_size):
            ranks = dp_ranks[c:c + ep_size]
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                ep_mine = g
        for slot in range(ep_size):
            ranks = dp_ranks[slot::ep_size]
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                edp_mine = g
    return ep_mine, edp_mine


def initialize(tp_size: int = 1, ep_sizes: Sequence[int] = (1,),
               timeout_minutes: Optional[float] = None) -> ParallelGroups:
    """Builds all groups for the current world (call once, after init_distributed); every group gets the timeout
    --distributed-timeout-minutes (None: torch's default)."""
    if not dist.is_initialized():
        validate_sizes(1, tp_size, ep_sizes)
        return ParallelGroups(1, 0, tp_size, 1, None, None,
                              {e: None for e in ep_sizes}, {e: None for e in ep_sizes})
    world_size, rank = dist.get_world_size(), dist.get_rank()
    dp_size = validate_sizes(world_size, tp_size, ep_sizes)
    timeout = _timeout(timeout_minutes)
    tp_group = _build_tp_groups(world_size, tp_size, rank, timeout)
    dp_group = _build_dp_groups(world_size, tp_size, rank, timeout)
    ep_groups, edp_groups = {}, {}
    for ep in sorted(set(ep_sizes)):
        ep_groups[ep], edp_groups[ep] = _build_expert_groups(world_size, tp_size, ep, rank, timeout)
    return ParallelGroups(world_size, rank, tp_size, dp_size, tp_group, dp_group, ep_groups, edp_groups)

