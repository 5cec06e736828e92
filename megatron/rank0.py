"""The one rank-0 output helper: the progress lines Megatron prints on global rank 0 only (stdout, flushed, so
log scrapers and tests read them in order), and the same test for code that logs through `logging`."""
import logging

import torch.distributed as dist


def is_rank0() -> bool:
    """Global rank 0, or a single process without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(msg: str) -> None:
    """`msg` on stdout on rank 0 only (Megatron's print_rank_0)."""
    if is_rank0():
        print(msg, flush=True)


def log_rank0(logger: logging.Logger, level: int, msg: str, *args) -> None:
    """`logger.log(level, msg, *args)` on rank 0 only (warnings every rank would repeat)."""
    if is_rank0():
        logger.log(level, msg, *args)
