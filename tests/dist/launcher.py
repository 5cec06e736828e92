"""`run_distributed`: run a function on N local gloo processes and return each rank's result;
`run_distributed_jobs`: run several such functions one after another in ONE spawn (a module fixture's batch), since
each spawn costs every rank a fresh Python + torch import."""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _entry_jobs(rank: int, jobs: list, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results = []
    try:
        for fn, args in jobs:  # in order: a later job may load what an earlier one saved
            results.append(fn(rank, world_size, *args))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed_jobs(jobs: List[Tuple[Callable, tuple]], world_size: int) -> List[List[Any]]:
    """Like run_distributed for each (fn, args) of `jobs`, in order, inside one spawn and one process group:
    returns [job][rank] results. An exception in any job fails the whole batch (with that rank's traceback)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry_jobs, args=(list(jobs), world_size, free_port(), out_dir), nprocs=world_size, join=True)
        per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    return [[per_rank[r][j] for r in range(world_size)] for j in range(len(jobs))]


def run_distributed(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    """Spawn `world_size` processes that each call fn(rank, world_size, *args) inside an initialised
    gloo process group (WORLD = all of them); return the list of their return values by rank.

    `fn` must be importable (module level) and its result picklable by torch.save. An exception in any
    rank is re-raised here (torch.multiprocessing.spawn reports it with the rank's traceback).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
