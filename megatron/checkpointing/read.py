"""Reading what --load names: the dense file of a TP rank and this rank's expert files, every file verified; and
--load-fallback: which directories --load may load (newest first), each verified on every rank; a torn or
corrupted one is refused with one line naming the file, or (with --load-fallback) skipped for the newest older one
that verifies, the refused directories set aside."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch.distributed as dist

from megatron.checkpointing import experts as expert_files
from megatron.checkpointing import integrity
from megatron.checkpointing.integrity import checkpoint_complete
from megatron.checkpointing.layout import (TRACKER, CorruptCheckpointError, dense_path, iter_dir, iteration_dirs,
                                           iteration_of, log_rank0, num_pp_stages, num_tp_shards, read_tracker,
                                           resolve_checkpoint_dir, write_tracker)
from megatron.errors import CheckpointError


def load_dense(load: str, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1
               ) -> Tuple[dict, str]:
    """This (TP, PP) rank's dense file; a checkpoint saved with another --tensor-model-parallel-size is refused.

    Saved with another --pipeline-model-parallel-size, the stages' files of this TP rank are merged (parameter
    names carry global layer indices, so the union is the whole model's dense state; the caller keeps its part:
    stage_view): counters, scheduler and configs come from stage 0, the RNG state from this rank's stage when it
    exists. This reads every stage's file once per rank while loading."""
    ckpt_dir, _ = resolve_checkpoint_dir(load)
    saved_tp, saved_pp = num_tp_shards(ckpt_dir), num_pp_stages(ckpt_dir)
    if saved_tp and saved_tp != tp_size:
        raise CheckpointError(f"--tensor-model-parallel-size mismatch: checkpoint {ckpt_dir} was saved with "
                              f"{saved_tp} tensor-parallel rank(s), the flags give {tp_size}; convert it with "
                              f"tools/checkpoint_reshard.py --target-tp {tp_size}")
    if saved_pp == pp_size:
        path = dense_path(ckpt_dir, tp_rank, pp_rank if pp_size > 1 else None)
        return integrity.load_checkpoint_file(ckpt_dir, path), ckpt_dir
    stages = [integrity.load_checkpoint_file(ckpt_dir, dense_path(ckpt_dir, tp_rank, p if saved_pp > 1 else None))
              for p in range(saved_pp)]
    merged = dict(stages[0])
    for key in ("model", "optimizer"):
        merged[key] = {k: v for st in stages for k, v in (st.get(key) or {}).items()}
    merged["rng"] = stages[pp_rank if pp_rank < saved_pp else 0].get("rng")
    return merged, ckpt_dir


def stage_view(payload: dict, model) -> dict:
    """`payload` with only the dense parameters (and their optimizer state) `model` holds: a pipeline stage
    loading a checkpoint saved at another --pipeline-model-parallel-size (whose other entries are other stages')."""
    own = set(model.state_dict())
    out = dict(payload)
    for key in ("model", "optimizer"):
        out[key] = {k: v for k, v in (payload.get(key) or {}).items() if k in own}
    return out


def load_candidates(load: str) -> Tuple[List[Tuple[str, int]], Optional[str]]:
    """What --load may load, newest first: the directory the tracker names (or --load itself when it is an
    iter_XXXXXXX directory), then every older iter_XXXXXXX directory; and why the tracker's choice cannot be loaded at
    all (a corrupted or missing tracker, or one naming a missing directory), else None."""
    if not os.path.exists(load):
        raise CheckpointError(f"--load {load}: no such directory")
    if iteration_of(load) is not None and os.path.isdir(load):
        return [resolve_checkpoint_dir(load)], None
    dirs = iteration_dirs(load)
    try:
        it = read_tracker(load)
    except CorruptCheckpointError as e:
        return dirs, str(e)
    if it is None:
        if not dirs:
            raise CheckpointError(f"--load {load}: no {TRACKER} and not an iter_XXXXXXX directory")
        return dirs, f"--load {load}: {os.path.join(load, TRACKER)} is missing"
    older = [(d, i) for d, i in dirs if i < it]
    d = iter_dir(load, it)
    if not os.path.isdir(d):
        return older, f"{os.path.join(load, TRACKER)} names iteration {it} but {d} is missing; the checkpoint is torn"
    return [(d, it)] + older, None


def _first_error(err: Optional[str]) -> Optional[str]:
    """The lowest rank's error (None when no rank failed), on every rank: ranks read different expert files, so
    one may find a problem the others cannot see, and all must take the same decision."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return err
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, err)
    return next((e for e in out if e), None)


def _read_verified(ckpt_dir: str, model, groups, check=None, keep_optimizer: bool = True):
    """((dense payload, this rank's expert payloads), None), or (None, why) for a torn or corrupted checkpoint.
    `check(payload, ckpt_dir)` runs between the dense file and the expert files: a checkpoint of another architecture
    is reported as that (a CheckpointError naming the flag), not as the expert files it lacks. `keep_optimizer`: as
    read_expert_files."""
    try:
        pp_size = getattr(groups, "pp_size", 1)
        payload, _ = load_dense(ckpt_dir, groups.tp_rank, groups.tp_size, groups.pp_rank if pp_size > 1 else 0,
                                pp_size)
        if pp_size > 1:
            payload = stage_view(payload, model)
        if check is not None:
            check(payload, ckpt_dir)
        return (payload, expert_files.read_expert_files(model, ckpt_dir, keep_optimizer)), None
    except CorruptCheckpointError as e:
        return None, str(e)


def read_training_checkpoint(ck, model, groups, check=None, keep_optimizer: bool = True) -> Tuple[str, dict, dict]:
    """(directory, dense payload, this rank's expert payloads) of what --load names, every file verified (without
    `keep_optimizer`, the expert payloads hold no Adam state: see read_expert_files).

    A torn or corrupted checkpoint (or tracker) is an error that names the file and the iteration --load-fallback
    would load; with --load-fallback (ck.load_fallback) the newest older iteration that verifies on every rank is
    loaded instead, said in one log line (see _after_fallback for what happens to the refused directories).
    Collective when distributed: every rank calls it."""
    candidates, problem = load_candidates(ck.load)
    refused: List[Tuple[Optional[str], str]] = [(None, problem)] if problem is not None else []
    tried = 0
    for d, it in candidates:
        if refused and not ck.load_fallback:
            break
        got, err = _read_verified(d, model, groups, check, keep_optimizer)
        err = _first_error(err)
        tried += 1
        if err is None:
            if refused:
                _after_fallback(ck, refused, d, it)
            return d, got[0], got[1]
        refused.append((d, err))
    if ck.load_fallback:
        raise CorruptCheckpointError(f"{refused[0][1]}; --load-fallback found no older checkpoint in {ck.load} that "
                                     f"verifies")
    nxt = next((it for d, it in candidates[tried:] if checkpoint_complete(d)), None)
    hint = (f"--load-fallback would load iteration {nxt}, the newest older complete checkpoint" if nxt is not None
            else f"no older complete checkpoint exists in {ck.load}")
    raise CorruptCheckpointError(f"{refused[0][1]}; {hint}")


def _after_fallback(ck, refused, ckpt_dir: str, iteration: int) -> None:
    """One log line; and, when --save is the --load directory (later saves will write there), rank 0 renames each
    refused iter_XXXXXXX to iter_XXXXXXX.corrupt (kept for inspection, never deleted; a later save of the same
    iteration can then neither replace nor be confused with it) and points the tracker at the loaded iteration."""
    note = ""
    if ck.save and os.path.abspath(ck.save) == os.path.abspath(ck.load) and not (
            dist.is_initialized() and dist.get_rank() != 0):
        moved = []
        try:
            for bad, _ in refused:
                if bad is not None and os.path.isdir(bad):
                    target = bad + ".corrupt"
                    n = 1
                    while os.path.exists(target):
                        target, n = f"{bad}.corrupt{n}", n + 1
                    os.replace(bad, target)
                    moved.append(os.path.basename(target))
            write_tracker(ck.load, iteration)
            note = (f"; kept the refused checkpoint as {', '.join(moved)} and " if moved else "; ") + \
                f"pointed {TRACKER} at iteration {iteration}"
        except OSError as e:
            note = f"; could not set the refused checkpoint aside ({e.strerror})"
    log_rank0(f"--load-fallback: {refused[0][1]}; loaded iteration {iteration} ({ckpt_dir}) instead{note}")


