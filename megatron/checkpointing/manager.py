"""The training loop's one entry to saving: `CheckpointManager.maybe_save(iteration, force)` decides whether a
checkpoint is due, collects the state of the objects the loop registered (torchtitan's `Stateful` idea), and saves
synchronously or, with --async-save, writes on a background thread while training goes on."""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Optional, Protocol

import torch
import torch.distributed as dist

from megatron.checkpointing import optim_state, save
from megatron.checkpointing.payload import StagingPool

log = logging.getLogger("megatron.checkpointing")


class Stateful(Protocol):
    """What the loop registers: an object whose state_dict() a checkpoint records under its name."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class AsyncWrite:
    """The rest of one save on a daemon thread: the snapshot's deferred copies (then `copied` is set), then phase 2
    (save.write: files, hashes, fsyncs into the temporary directory)."""

    def __init__(self, pending: save.PendingSave):
        self.pending = pending
        self.started = time.perf_counter()
        self.copied = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.pending.snapshot is not None:
                self.pending.snapshot.copy_deferred()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by commit
            self.pending.error = e
        finally:
            self.copied.set()
        self.pending.snapshot = None
        if self.pending.error is None:
            save.write(self.pending)
        else:
            self.pending.items = []

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> save.PendingSave:
        self._thread.join()
        return self.pending


class CheckpointManager:
    """Saves `model` and `optimizer` (and every registered Stateful) to `root` every `interval` iterations.

    Args:
      root: --save (None: maybe_save does nothing).
      interval: --save-interval (None: only forced saves).
      model, optimizer, groups: what is saved and the process groups (dense state by DP rank 0, experts by
        expert-DP rank 0; see save.py).
      configs: what the checkpoint records of the configuration (load.configs_for_checkpoint).
      async_save: --async-save: `maybe_save` snapshots every tensor into CPU staging buffers (kept for the next
        save) and returns; the copies of CPU parameters and optimizer state are made on the background thread while
        the next forward/backward runs (an optimizer step pre-hook holds the next step until they are done); the
        thread then writes, hashes and fsyncs; the commit (checksums.json, rename, then the tracker) happens on the training
        thread at the first `maybe_save`/`wait` after the write finished (a collective when distributed: every rank
        calls maybe_save every iteration). A second save waits for the first; a failed write raises CheckpointError
        (one line) at that commit, and the previous checkpoint stays the tracker's.
    """

    def __init__(self, root: Optional[str], interval: Optional[int], model, optimizer, groups, configs: dict,
                 async_save: bool = False):
        self.root, self.interval, self.async_save = root, interval, async_save
        self.model, self.optimizer, self.groups, self.configs = model, optimizer, groups, configs
        self.states: Dict[str, Optional[Stateful]] = {}
        self.last_saved: Optional[int] = None  # the iteration of the newest save started (committed or pending)
        self.stall_seconds: list = []  # the training thread's time inside each save (benchmarks report it)
        self._inflight: Optional[AsyncWrite] = None
        self._pool = StagingPool() if async_save else None  # snapshot buffers reused from save to save
        self.waited_seconds = 0.0  # optimizer steps held for the deferred snapshot copies (part of the stall)
        # parameters and optimizer state change only in the optimizer step: their snapshot copies run on the
        # writing thread behind the next forward/backward, and the step waits for them (when it offers a hook)
        self._defer = bool(async_save and optimizer is not None
                           and optim_state.register_step_pre_hook(optimizer, self._before_optimizer_step))

    def register(self, name: str, obj: Optional[Stateful]) -> None:
        """Records obj.state_dict() under `name` in the dense payload ("scheduler", "loss_scaler", "counters")."""
        self.states[name] = obj

    def due(self, iteration: int, force: bool = False) -> bool:
        if not self.root or iteration == self.last_saved:
            return False
        return force or bool(self.interval and iteration % self.interval == 0)

    def maybe_save(self, iteration: int, force: bool = False) -> Optional[str]:
        """Commits a finished asynchronous save; then saves `iteration` when it is due (every `interval` iterations,
        or `force`: exit, end of training), unless it was the last one saved. Returns the directory of a
        synchronous save (the final name of an asynchronous one), else None. Collective: every rank calls it."""
        self.poll()
        if not self.due(iteration, force):
            return None
        self.wait()  # a second save waits for the first
        t0 = time.perf_counter()
        optim_state.settle(self.optimizer)
        states = {name: (obj.state_dict() if obj is not None else None) for name, obj in self.states.items()}
        pending = save.prepare(self.root, iteration, self.model, self.optimizer, states, self.configs, self.groups,
                               snapshot=self.async_save, pool=self._pool, defer_params=self._defer)
        self.last_saved = iteration
        if self.async_save:
            self._inflight = AsyncWrite(pending)
            self.stall_seconds.append(time.perf_counter() - t0)
            _log_rank0(f"saving checkpoint of iteration {iteration} in the background "
                       f"({pending.snapshot_bytes / 1e6:.1f} MB staged; training held {self.stall_seconds[-1]:.2f} s)")
            return save.iter_dir(self.root, iteration)
        path = save.commit(save.write(pending))
        self.stall_seconds.append(time.perf_counter() - t0)
        _log_rank0(f"saved checkpoint {path}")
        return path

    def _before_optimizer_step(self) -> None:
        inflight = self._inflight
        if inflight is not None and not inflight.copied.is_set():
            t0 = time.perf_counter()
            inflight.copied.wait()
            self.waited_seconds += time.perf_counter() - t0

    def poll(self) -> None:
        """Commits the pending asynchronous save if every rank's write has finished (without waiting)."""
        if self._inflight is None:
            return
        if _all_ranks(self._inflight.done(), self._inflight.pending):
            self._commit()

    def wait(self) -> None:
        """Blocks until the pending asynchronous save (if any) is written and committed; before exit, at the end of
        training, before a second save. Raises CheckpointError when its write failed."""
        if self._inflight is not None:
            self._inflight.join()
            self._commit()

    def close(self, ok: bool = True) -> None:
        """wait(); after an error elsewhere (`ok` False) the write is still awaited, and committed only in a single
        process (a distributed commit needs every rank, which may have gone), with a failure logged, not raised."""
        if self._inflight is None:
            return
        if ok:
            self.wait()
            return
        pending = self._inflight.join()
        self._inflight = None
        self._pool.give_back()
        if not pending.distributed:
            try:
                save.commit(pending)
                _log_rank0(f"saved checkpoint {save.iter_dir(pending.root, pending.iteration)}")
            except Exception as e:  # noqa: BLE001 - the first error is the one reported
                log.error("the pending checkpoint save of iteration %d failed too: %s", pending.iteration, e)

    def _commit(self) -> None:
        inflight, self._inflight = self._inflight, None
        self._pool.give_back()  # written (or failed): the payloads are released, the buffers are free
        path = save.commit(inflight.pending)
        _log_rank0(f"saved checkpoint {path} (written in the background in "
                   f"{time.perf_counter() - inflight.started:.2f} s)")


def _all_ranks(flag: bool, pending: save.PendingSave) -> bool:
    """Whether `flag` holds on every rank (one all-reduce when distributed, so all ranks commit together)."""
    if not pending.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=pending.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _log_rank0(msg: str) -> None:
    if not (dist.is_initialized() and dist.get_rank() != 0):
        print(msg, flush=True)
