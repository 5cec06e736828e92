"""What one rank writes: the dense payload (model, optimizer, scheduler, loss scaler, RNG, counters, configs) and its
expert payloads, built from live tensors (synchronous save) or from a CPU snapshot of them (asynchronous save)."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch

from megatron.checkpointing import optim_state
from megatron.checkpointing.experts import expert_payloads, is_expert_param_name, model_tp_rank
from megatron.checkpointing.copies import one_intra_op_thread
from megatron.checkpointing.layout import dense_path
from megatron.checkpointing.rng import get_rng_state

CHECKPOINT_VERSION = 1


def exact_view(t: torch.Tensor) -> torch.Tensor:
    """`t` (one expert's slice of a stacked tensor) as a tensor whose storage is exactly its own bytes, without a
    copy: torch.save of a plain slice would write the stacked tensor's whole storage. A storage slice shares the
    memory (on the GPU too), so the synchronous save clones nothing; a non-contiguous slice is copied instead."""
    t = t.detach()
    if t.device.type == "meta":  # no storage to cut (a model built with meta experts: HF import writes them later)
        return t
    if not t.is_contiguous():
        return t.contiguous()
    n = t.element_size()
    start = t.storage_offset() * n
    storage = t.untyped_storage()[start:start + t.numel() * n]
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, t.size(), t.stride())


class StagingPool:
    """CPU buffers kept from one asynchronous save to the next (by size; a model's storages keep their sizes), so a
    snapshot is a plain memcpy into memory already faulted in (pinned for GPU sources). Fresh memory costs its page
    faults: measured on the 2-core machine, 0.4-0.5 GB/s into new buffers against 2.2 GB/s into reused ones. The
    price is one CPU copy of the checkpointed state held between saves (as Megatron-LM's and
    torch.distributed.checkpoint's staging buffers are)."""

    def __init__(self):
        self._free: Dict[Tuple[int, bool], List[torch.UntypedStorage]] = {}
        self._lent: List[Tuple[Tuple[int, bool], torch.UntypedStorage]] = []

    def take(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        key = (nbytes, pinned)
        free = self._free.get(key)
        buf = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        self._lent.append((key, buf))
        return buf

    def give_back(self) -> None:
        """Every buffer lent since the last call is free again (the save that used them is written)."""
        for key, buf in self._lent:
            self._free.setdefault(key, []).append(buf)
        self._lent = []


class CpuSnapshot:
    """Copies every distinct tensor storage reached from a payload once into CPU memory (pinned when it comes from a
    GPU: the copies are then asynchronous and `finish` waits once) and rebuilds each tensor as a view of its copy
    with the same offset, size and stride. Sharing (tied weights, ZeRO's flat buffers) is kept, so torch.save
    writes the same bytes as it would from the live tensors.

    With `defer_params`, the copies of CPU parameters and optimizer state (which only the optimizer step changes)
    are only recorded; `copy_deferred` (the save's background thread) makes them while the next forward and backward
    run, and the manager holds the next optimizer step until they are done. Buffers, RNG, scheduler and counters
    are copied at once (the forward may change buffers)."""

    def __init__(self, pool: Optional[StagingPool] = None, defer_params: bool = False):
        self._memo: Dict[Tuple[str, int, int], torch.UntypedStorage] = {}  # (device, address, bytes) -> copy
        self._pool = pool if pool is not None else StagingPool()
        self._from_gpu = False
        self._deferred: List[Tuple[torch.UntypedStorage, torch.UntypedStorage]] = []  # (copy, live) to fill
        self.defer_params = defer_params
        self.bytes = 0

    def __call__(self, obj, defer: bool = False):
        """`obj` with every tensor replaced by its CPU copy; `defer`: obj holds parameters or optimizer state."""
        if torch.is_tensor(obj):
            return self._tensor(obj, defer)
        if isinstance(obj, dict):
            return {k: self(v, defer) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self(v, defer) for v in obj)
        return obj

    def _tensor(self, t: torch.Tensor, defer: bool) -> torch.Tensor:
        s = t.untyped_storage()
        key = (str(t.device), s.data_ptr(), s.nbytes())  # a storage slice (exact_view) is its own entry
        copy = self._memo.get(key)
        if copy is None:
            gpu = t.device.type != "cpu"
            copy = self._memo[key] = self._pool.take(s.nbytes(), pinned=gpu and torch.cuda.is_available())
            if defer and self.defer_params and not gpu:
                self._deferred.append((copy, s))
            else:
                _bytes_of(copy).copy_(_bytes_of(s), non_blocking=gpu)  # a tensor copy: parallel, unlike storage's
            self._from_gpu |= gpu
            self.bytes += s.nbytes()
        return torch.empty(0, dtype=t.dtype).set_(copy, t.storage_offset(), t.size(), t.stride())

    def finish(self) -> None:
        """Waits for the GPU-to-CPU copies (after this the live tensors may change, except the deferred ones)."""
        if self._from_gpu:
            torch.cuda.synchronize()

    def copy_deferred(self) -> None:
        """Makes the deferred copies (parameters and optimizer state must not change meanwhile)."""
        with one_intra_op_thread():
            for copy, live in self._deferred:
                _bytes_of(copy).copy_(_bytes_of(live))
        self._deferred = []


def _bytes_of(s: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=s.device).set_(s)


def rank_payloads(iteration: int, model, optimizer, states: Dict[str, Optional[dict]], configs: dict, groups,
                  snapshot: Optional[CpuSnapshot] = None) -> List[Tuple[str, object]]:
    """(path relative to the iteration directory, payload) of every file this rank writes.

    `states`: the state_dict()s of the registered objects ("scheduler", "loss_scaler", "counters"), each stored under
    its name in the dense payload. With `snapshot`, every tensor is a CPU copy that training may not change (the
    asynchronous save writes them while training goes on); without, the live tensors (expert slices as exact
    views: nothing is cloned). Collective under ZeRO (the optimizer state is gathered to the writing ranks)."""
    opt_state = optim_state.gathered_state(model, optimizer) if optimizer is not None else {}
    with one_intra_op_thread() if snapshot is not None else contextlib.nullcontext():
        out = _payloads(iteration, model, optimizer, opt_state, states, configs, groups, snapshot)
    if snapshot is not None:
        snapshot.finish()
    return out


def _payloads(iteration, model, optimizer, opt_state, states, configs, groups, snapshot):
    own = snapshot if snapshot is not None else (lambda x, defer=False: x)
    take_slice = (lambda t: snapshot(exact_view(t), defer=True)) if snapshot is not None else exact_view
    is_expert = is_expert_param_name(model)  # {parameter name: is an expert's}
    dp_rank = groups.dp_rank if groups is not None else 0
    out = []
    if dp_rank == 0 and getattr(groups, "cp_rank", 0) == 0:  # CP ranks hold identical replicas: one writes
        payload = {
            "iteration": iteration,
            "model": {k: own(v, defer=k in is_expert) for k, v in model.state_dict().items()
                      if not is_expert.get(k, False)},  # parameters deferred, buffers copied at once
            "optimizer": own({k: v for k, v in opt_state.items() if not is_expert.get(k, False)}, defer=True),
            "scheduler": own(states.get("scheduler")),
            "loss_scaler": own(states.get("loss_scaler")),
            "rng": own(get_rng_state(model)),
            "counters": own(dict(states.get("counters") or {})),
            "configs": configs,
            "checkpoint_version": CHECKPOINT_VERSION,
        }
        pp = getattr(groups, "pp_size", 1) > 1  # each stage writes its own layers (global names) and optimizer state
        out.append((dense_path("", model_tp_rank(model), groups.pp_rank if pp else None), payload))
    out.extend(expert_payloads(model, opt_state, groups, optimizer, take_slice))
    return out
