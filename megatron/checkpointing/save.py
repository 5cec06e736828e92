"""Saving a checkpoint in three phases, so that the middle one can run on a background thread (--async-save):

1. `prepare` (training thread, collective): the temporary directory, and this rank's payloads (live tensors, or a
   CPU snapshot of them for an asynchronous save);
2. `write` (any thread, local file I/O only): each file written to the temporary directory, hashed on its way
   (`integrity.atomic_torch_save`), then all of them fsynced together (`integrity.fsync_files`);
3. `commit` (training thread, collective): every rank's file list and failures gathered; rank 0 writes
   checksums.json, fsyncs, renames the directory into place, then replaces the tracker. A crash at any moment
   leaves the previous checkpoint loadable; a failed write keeps nothing of the new one.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.checkpointing.experts import moe_layers
from megatron.checkpointing.integrity import atomic_torch_save, fsync_files, write_manifest
from megatron.checkpointing.layout import fsync_dir, iter_dir, read_tracker_or_none, tmp_iter_dir, write_tracker
from megatron.checkpointing.payload import CpuSnapshot, StagingPool, rank_payloads
from megatron.errors import CheckpointError


@dataclass
class PendingSave:
    """One save between `prepare` and `commit`."""
    root: str
    iteration: int
    tmp: str  # the temporary directory the files are written to
    items: List[Tuple[str, object]]  # (path relative to the iteration directory, payload) of this rank
    device: torch.device  # where the failure flag of the commit's all-reduce lives (the model's device)
    distributed: bool
    rank: int
    snapshot_bytes: int = 0
    snapshot: Optional[CpuSnapshot] = None  # holds the copies deferred to the writing thread (copy_deferred)
    files: Dict[str, dict] = field(default_factory=dict)  # written: {relative path: {"bytes", "xxh3_64"}}
    failure: Optional[OSError] = None  # a failed write (full disk, vanished mount, ...)
    error: Optional[BaseException] = None  # anything else raised by the write (a bug): re-raised by commit


def prepare(root: str, iteration: int, model, optimizer, states: Dict[str, Optional[dict]], configs: dict,
            groups=None, snapshot: bool = False, pool: Optional[StagingPool] = None,
            defer_params: bool = False) -> PendingSave:
    """Phase 1 (collective): refuses experts it could not name (before anything is written), empties the temporary
    directory, builds this rank's payloads; with `snapshot`, every tensor in them is a CPU copy (in `pool`'s
    buffers when given); with `defer_params` too, the copies of CPU parameters and optimizer state are left to the
    writing thread (CpuSnapshot.copy_deferred), which must make them before the next optimizer step."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    moe_layers(model)
    tmp = tmp_iter_dir(root, iteration)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    snap = CpuSnapshot(pool, defer_params) if snapshot else None
    try:
        items = rank_payloads(iteration, model, optimizer, states, configs, groups, snap)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed:
        dist.barrier()  # the temporary directory exists before any rank writes into it
    device = next(model.parameters()).device
    return PendingSave(root, iteration, tmp, items, device, distributed, rank, snap.bytes if snap else 0, snap)


def write(p: PendingSave, after_write=None) -> PendingSave:
    """Phase 2 (no collectives, safe on a background thread): writes this rank's files into p.tmp. A failed write
    (OSError) is recorded in p.failure, anything else in p.error; the payloads are released either way.
    `after_write()` runs after each chunk written (atomic_torch_save)."""
    hook = {"after_write": after_write} if after_write is not None else {}  # the plain call otherwise
    try:
        for rel, obj in p.items:
            p.files[rel] = atomic_torch_save(obj, os.path.join(p.tmp, rel), sync=False, **hook)
        fsync_files(os.path.join(p.tmp, rel) for rel in p.files)  # before commit's rename makes them the checkpoint
        for d in {os.path.dirname(os.path.join(p.tmp, rel)) for rel in p.files}:
            fsync_dir(d)  # their names too (a rank's own subdirectories; rank 0 fsyncs the temporary directory)
    except OSError as e:
        p.files, p.failure = {}, e
    except BaseException as e:  # noqa: BLE001 - handed to the training thread, which re-raises it
        p.error = e
    p.items = []
    return p


def commit(p: PendingSave) -> str:
    """Phase 3 (collective): makes the written files the checkpoint of p.iteration, or raises CheckpointError (one
    line: what failed, and that the previous checkpoint is intact) having removed them."""
    if p.error is not None:  # an internal error: no partial directory, and the traceback goes on
        if p.rank == 0:
            shutil.rmtree(p.tmp, ignore_errors=True)
        raise p.error
    failure = p.failure
    # every rank's (failure, files written): one collective in place of a barrier, so no rank waits forever
    failed, files = _gather_files(failure is not None, p.files, p.distributed)
    if not failed and p.rank == 0:
        try:
            write_manifest(p.tmp, p.iteration, files)  # last, so a directory with checksums.json is complete
        except OSError as e:
            failure = e
    if failed or _any_rank_failed(failure is not None, p.device, p.distributed):
        if p.rank == 0:
            shutil.rmtree(p.tmp, ignore_errors=True)
        previous = read_tracker_or_none(p.root)
        what = (("the disk is full" if failure.errno == 28 else failure.strerror or str(failure))
                if failure is not None else "another rank failed to write its files")
        raise CheckpointError(f"--save {p.root}: writing the checkpoint of iteration {p.iteration} failed ({what}); "
                              f"nothing of it was kept, and the previous checkpoint "
                              f"({'iteration ' + str(previous) if previous is not None else 'none'}) is intact: "
                              f"free space or point --save elsewhere, then resume with --load") from None
    final = iter_dir(p.root, p.iteration)
    if p.rank == 0:
        fsync_dir(p.tmp)  # checksums.json's name (each rank fsynced the directories of its own files)
        old = None
        if os.path.exists(final):  # re-saving the same iteration: keep the old one until the new is in place
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(p.tmp, final)
        write_tracker(p.root, p.iteration)  # only after the rename: the tracker never names a missing directory
        if old:
            shutil.rmtree(old, ignore_errors=True)
    if p.distributed:
        dist.barrier()
    return final


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, loss_scaler, counters: dict,
                    configs: dict, groups=None) -> str:
    """Writes iter_{iteration} synchronously and atomically (the three phases above, back to back).

    Dense state is written by DP rank 0 of each TP rank; each expert file by expert-DP rank 0 of the EP
    group that owns it. All ranks call this (collective barriers when distributed).
    """
    states = {"scheduler": scheduler.state_dict() if scheduler is not None else None,
              "loss_scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
              "counters": dict(counters)}
    return commit(write(prepare(root, iteration, model, optimizer, states, configs, groups)))


def _gather_files(failed: bool, files: Dict[str, dict], distributed: bool) -> Tuple[bool, Dict[str, dict]]:
    """(whether any rank failed, the union of every rank's written files) on every rank."""
    if not distributed:
        return failed, files
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (failed, files))
    return any(f for f, _ in out), {k: v for _, fs in out for k, v in sorted(fs.items())}


def _any_rank_failed(failed: bool, device: torch.device, distributed: bool) -> bool:
    """Whether any rank's write failed (an all-reduce in place of the barrier, so no rank waits forever)."""
    if not distributed:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
