"""Where a checkpoint's files live: the iteration directories, the tracker, the file names (DESIGN.md §5).

    SAVE/latest_checkpointed_iteration.txt                              the newest complete iteration (a number)
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt                     dense state of TP rank 00
    SAVE/iter_0000100/mp_rank_00_001/model_optim_rng.pt                 ... of TP rank 00, PP stage 001 (PP > 1)
    SAVE/iter_0000100/layer_{L}_expert_{E}_mp_rank_{R}_model_states.pt  expert E of MoE layer L (+ its Adam state);
                                                                        R = its ETP rank (00 without ETP)
    SAVE/iter_0000100/checksums.json                                    size and xxh3-64 of every file, written last
    SAVE/.tmp_iter_0000100/                                             a save in progress (renamed when complete)
"""
from __future__ import annotations

import logging
import os
import re
from typing import List, Optional, Tuple

import torch.distributed as dist

from megatron.checkpointing.faults import fault_point
from megatron.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
DENSE_FILE = "model_optim_rng.pt"
MANIFEST = "checksums.json"  # {relative path: {"bytes", "xxh3_64"}} of every file of the iteration directory
ITER_DIR_RE = re.compile(r"iter_(\d+)")  # the one pattern of an iteration directory's name (written with 7 digits)

log = logging.getLogger("megatron.checkpointing")


class CorruptCheckpointError(CheckpointError):
    """A torn or corrupted checkpoint: a file (or the tracker, or checksums.json) that is missing, truncated,
    unreadable or different from its recorded checksum. --load-fallback may skip such a checkpoint."""


def log_rank0(msg: str) -> None:
    if not (dist.is_initialized() and dist.get_rank() != 0):
        log.info(msg)


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def tmp_iter_dir(root: str, iteration: int) -> str:
    """Where a save of `iteration` is written before its rename to iter_dir (never loaded)."""
    return os.path.join(root, f".tmp_iter_{iteration:07d}")


def dense_path(ckpt_dir: str, tp_rank: int = 0, pp_rank: Optional[int] = None) -> str:
    """The dense file of (TP rank, PP rank): mp_rank_XX at --pipeline-model-parallel-size 1 (pp_rank None),
    mp_rank_XX_YYY with pipeline stages (Megatron-LM's names)."""
    rank_dir = f"mp_rank_{tp_rank:02d}" if pp_rank is None else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(ckpt_dir, rank_dir, DENSE_FILE)


def expert_path(ckpt_dir: str, moe_layer: int, expert_id: int, tp_rank: int = 0) -> str:
    return os.path.join(ckpt_dir, f"layer_{moe_layer}_expert_{expert_id}_mp_rank_{tp_rank:02d}_model_states.pt")


def iteration_of(path: str) -> Optional[int]:
    """The iteration an iter_XXXXXXX directory name (or a path ending in one) names; None for any other name."""
    m = ITER_DIR_RE.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def iteration_dirs(root: str) -> List[Tuple[str, int]]:
    """(directory, iteration) of every iter_XXXXXXX directory under `root`, newest first."""
    out = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        it = iteration_of(name)
        if it is not None and os.path.isdir(os.path.join(root, name)):
            out.append((os.path.join(root, name), it))
    return sorted(out, key=lambda x: -x[1])


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- tracker
def read_tracker(root: str) -> Optional[int]:
    """The iteration the tracker names; None without a tracker; CorruptCheckpointError when it holds no number."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    text = raw.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise CorruptCheckpointError(f"{path}: the tracker file is corrupted (expected an iteration number, found "
                                     f"{text[:40]!r})")
    return int(text)


def read_tracker_or_none(root: str) -> Optional[int]:
    try:
        return read_tracker(root)
    except CheckpointError:
        return None


def write_tracker(root: str, iteration: int) -> None:
    """Replaces the tracker atomically (tmp file, fsync, rename, fsync of the directory)."""
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    fault_point("tracker")
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    fsync_dir(root)


# ----------------------------------------------------------------------------------------------- what --load names
def nothing_to_load(load: str) -> Optional[str]:
    """Why `load` holds no checkpoint to resume from (Megatron then starts from scratch with a warning), or None
    when there is one to load. A directory with iter_* checkpoints but no tracker is not "nothing": it is an error
    for resolve_checkpoint_dir to report, never silently restarted."""
    if iteration_of(load) is not None:
        return None  # an explicit iter_XXXXXXX directory: a missing one is a typo, reported by the loader
    if not os.path.exists(load):
        return "no such directory"
    if os.path.isfile(os.path.join(load, TRACKER)):
        return None
    if os.path.isdir(load) and not any(iteration_of(d) is not None for d in os.listdir(load)):
        return f"no {TRACKER} (no checkpoint saved there yet)"
    return None


def resolve_checkpoint_dir(load: str) -> Tuple[str, int]:
    """--load may name the root (tracker inside) or an iter_XXXXXXX directory."""
    if not os.path.exists(load):
        raise CheckpointError(f"--load {load}: no such directory")
    it = iteration_of(load)
    if it is not None and os.path.isdir(load):
        return load, it
    it = read_tracker(load)
    if it is None:
        raise CheckpointError(f"--load {load}: no {TRACKER} and not an iter_XXXXXXX directory")
    d = iter_dir(load, it)
    if not os.path.isdir(d):
        raise CorruptCheckpointError(f"--load {load}: {TRACKER} names iteration {it} but {d} is missing")
    return d, it


def _rank_dirs(ckpt_dir: str) -> List[Tuple[int, Optional[int]]]:
    """(tp rank, pp rank or None) of every mp_rank_XX[_YYY] directory of `ckpt_dir`."""
    out = []
    for d in os.listdir(ckpt_dir):
        m = re.fullmatch(r"mp_rank_(\d\d)(?:_(\d\d\d))?", d)
        if m:
            out.append((int(m.group(1)), int(m.group(2)) if m.group(2) is not None else None))
    return out


def num_tp_shards(ckpt_dir: str) -> int:
    """How many tensor-parallel ranks wrote `ckpt_dir` (its mp_rank_XX or mp_rank_XX_YYY directories)."""
    return len({tp for tp, _ in _rank_dirs(ckpt_dir)})


def num_pp_stages(ckpt_dir: str) -> int:
    """How many pipeline stages wrote `ckpt_dir` (1: mp_rank_XX directories; else the YYY of mp_rank_XX_YYY)."""
    return len({pp for _, pp in _rank_dirs(ckpt_dir) if pp is not None}) or 1
