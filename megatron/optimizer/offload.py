"""AdamW whose expert parameters' Adam state (exp_avg, exp_avg_sq) lives in NVMe files, one record per
(MoE layer, expert), swapped through a few page-locked buffers by moe.offload.swap; dense parameters keep
torch's in-memory AdamW.

Exactness: each expert's update runs torch's own functional AdamW (`torch.optim.adam.adam`, decoupled weight
decay, the same fused/foreach choice and group hyperparameters) on the expert's slices of the stacked parameters
and gradients and on its state read back from disk. AdamW is elementwise, so this is bit for bit the in-memory
step provided the kernel treats an element the same wherever it sits: true for foreach and single-tensor AdamW,
and for the fused CPU kernel when each expert's slice of a parameter has a multiple of 16 elements (it runs
16-element units with a scalar tail; hidden sizes are multiples of 16 in practice; a warning says otherwise).
An expert that got no tokens has a zero gradient row and is stepped (weight decay, bias correction) like any
other. Mixed precision here is autocast over fp32 parameters, so there are no separate fp32 master weights to
offload: the parameters themselves stay resident for the forward pass.

On a GPU (`_CudaSwap`) the swap buffers are registered with CUDA and each record's update (copy in, AdamW, copy
back) is queued on a stream of the swap's own on the parameters' device, ordered by events: the swap stream waits
for the backward and the dense step; the writer thread waits for a record's copy back (its event) before writing it;
the training stream waits for a MoE layer's last update before that layer's next forward. No per-record host sync.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.optim.adam import adam

from megatron.errors import ConfigError
from megatron.optimizer.adamw import AdamWOptimizer, hyper, kernel, param_groups
from megatron.optimizer.base import MegatronOptimizer
from moe.experts import is_expert_param
from moe.layer import MoELayer
from moe.offload.config import OptimizerOffloadConfig
from moe.offload.store import open_training_store
from moe.offload.swap import StateSwapper

log = logging.getLogger(__name__)
STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class _InFlight:
    """An expert step running behind the training thread: the MoE layers not yet stepped, its error."""

    pending: set
    events: dict = field(default_factory=dict)  # CUDA: MoE layer -> event after its last update on the swap stream
    cond: threading.Condition = field(default_factory=threading.Condition)
    done: bool = False
    error: Optional[BaseException] = None
    thread: Optional[threading.Thread] = None


class _CudaSwap:
    """The CUDA side of the swapped expert step: one stream on the parameters' device (explicit, never the current
    device of whichever thread runs the swap) and the events that order it against the training stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def follow_training(self, grads) -> None:
        """Training thread, at step(): the swap stream waits for what was queued so far (backward, clipping, the
        dense step); the gradients it reads are marked in use by it (the training thread drops them at zero_grad)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for g in grads:
            g.record_stream(self.stream)

    def context(self):
        """Device and stream for the update's kernels on the swap thread."""
        return _Both(torch.cuda.device(self.device), torch.cuda.stream(self.stream))

    def mark(self) -> torch.cuda.Event:
        """An event after everything queued on the swap stream so far."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def training_waits(self, event: Optional[torch.cuda.Event] = None) -> None:
        """The training stream waits for `event` (None: for all of the swap stream); no host sync."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event) if event is not None else current.wait_stream(self.stream)


class _Both:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def __enter__(self):
        self.a.__enter__()
        self.b.__enter__()

    def __exit__(self, *exc):
        self.b.__exit__(*exc)
        return self.a.__exit__(*exc)


def cuda_swap_for(device: torch.device) -> Optional[_CudaSwap]:
    """The CUDA swap machinery for parameters on `device` (its own stream on exactly that device); None elsewhere:
    the CPU path updates the records in place on the swapping thread."""
    return _CudaSwap(device) if device.type == "cuda" else None


def _step_device(group: dict, p: torch.Tensor) -> torch.device:
    """Where torch.optim.AdamW keeps a parameter's step count: on its device for capturable or fused, else the CPU
    (reading a device step count would sync the host on every update)."""
    return p.device if group["capturable"] or group["fused"] else torch.device("cpu")


class ExpertOffloadAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over the same param groups (the scheduler sets every group's lr as before); `step()`
    runs torch's step on the dense groups, then the swapped step on the expert groups (`moe=True`).

    Args:
        groups: megatron.optimizer.param_groups(model, ...).
        model: the model (its MoE layers name the records: layer_index, ep_rank, local experts).
        offload: the OptimizerOffloadConfig (mode nvme).
        rank, world_size: this process's global rank (its store is DIR/rank_XXXXX) and the world size.
        **adam_kwargs: lr, betas, eps, fused / foreach, as torch.optim.AdamW.
    State: `self.state` holds the dense parameters' state only; expert state is in the store, except each
    stacked expert parameter's step count (`expert_steps`, one 0-dim fp32 tensor as torch keeps it).
    """

    def __init__(self, groups, *, model: torch.nn.Module, offload: OptimizerOffloadConfig, rank: int = 0,
                 world_size: int = 1, **adam_kwargs):
        super().__init__(groups, **adam_kwargs)
        self.offload = offload
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        # per MoE layer: (moe index, ep_rank, local experts, [(name in layer, stacked param, its group)])
        self.layers: List[Tuple[int, int, int, List[Tuple[str, torch.nn.Parameter, dict]]]] = []
        moe_modules = []
        for prefix, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)):
            e = layer.num_local_experts
            params = []
            for name, p in layer.named_parameters():
                if not (is_expert_param(p) and p.requires_grad):
                    continue
                if getattr(p, "local_expert_index", None) is not None or p.dim() < 1 or p.shape[0] != e:
                    raise ConfigError(f"--moe-offload-optimizer nvme: MoE layer {prefix} has a user expert module "
                                      f"({name}); offload supports the built-in stacked GELU experts")
                params.append((name, p, group_of[p]))
            if layer.layer_index is None:
                raise ConfigError(f"--moe-offload-optimizer nvme: MoE layer {prefix} has no layer_index to name its "
                                  f"records by; set it to its position among the model's MoE layers")
            self.layers.append((layer.layer_index, layer.ep_rank, e, params))
            moe_modules.append(layer)
        self._warn_if_not_exact(adam_kwargs.get("fused"))
        self.expert_steps: Dict[torch.nn.Parameter, torch.Tensor] = {}
        layout = [((m, ep_rank * e + i), {f"{name}.{k}": (tuple(p.shape[1:]), p.dtype)
                                           for name, p, _ in params for k in STATE_KEYS})
                  for m, ep_rank, e, params in self.layers for i in range(e)]
        source = {"kind": "adam-state", "rank": rank, "world_size": world_size,
                  "records": [[m, g] for (m, g), _ in layout],
                  "tensors": sorted({f"{n}:{list(s)}" for _, t in layout for n, (s, _) in t.items()})}
        self._lock = None
        self._inflight: Optional[_InFlight] = None
        self._hooks = []
        self.overlap = offload.overlap and offload.pipeline
        device = next((p.device for *_, params in self.layers for _, p, _ in params), torch.device("cpu"))
        self._cuda = cuda_swap_for(device)
        StateSwapper.load_aio()  # before any disk space is reserved: a missing op is a one-line error
        self.store, self._lock = open_training_store(offload.directory, rank, ((m, g, t) for (m, g), t in layout),
                                                     source)
        try:
            self.swapper = StateSwapper(self.store, offload.buffer_count, offload.handle_kwargs(), offload.pipeline,
                                        offload.verify, pin_cuda=self._cuda is not None)
        except BaseException:
            self.close()
            raise
        if self.overlap:  # the next forward waits at each MoE layer for that layer's step only
            self._hooks = [layer.register_forward_pre_hook(lambda _m, _a, m=layer.layer_index: self._wait(m))
                           for layer in moe_modules]
        # record key -> (index into self.layers, local expert)
        self.local_expert_of = {(m, ep_rank * e + i): (idx, i) for idx, (m, ep_rank, e, _) in enumerate(self.layers)
                                for i in range(e)}
        log.info("expert optimizer state offloaded to %s: %d records, %.1f MB on disk, %d buffers of %.1f MB "
                 "resident (%s)", self.store.directory, len(self.store.records), self.store.total_bytes() / 1e6,
                 len(self.swapper.buffers), self.store.record_bytes / 1e6,
                 "pipelined, behind the next forward" if self.overlap else
                 "pipelined" if offload.pipeline else "not pipelined")

    def _warn_if_not_exact(self, fused: Optional[bool]) -> None:
        odd = [name for *_, params in self.layers for name, p, _ in params if p[0].numel() % 16]
        if fused and odd:
            log.warning("--moe-offload-optimizer: expert parameter %s has a slice size that is not a multiple of 16; "
                        "the fused AdamW kernel may then differ from the in-memory step in the last bit", odd[0])

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Steps the dense groups in memory, then the expert records. With overlap (OptimizerOffloadConfig.overlap,
        pipelined; --moe-offload-overlap) the expert swap runs on a thread of its own and this returns at once: the
        next forward waits at each MoE layer for that layer's experts only, and `synchronize()` waits for all of it
        (checkpoints, evaluation, the end of training). The step's gradients, learning rates and step counts are
        captured here, so zero_grad, a scheduler step or the next backward cannot change an update in flight."""
        assert closure is None, "closures are not supported with offloaded expert state"
        self.synchronize()
        everything = self.param_groups
        self.param_groups = [g for g in everything if not g.get("moe")]
        try:
            super().step()
        finally:
            self.param_groups = everything
        self._step_experts()

    def _step_experts(self) -> None:
        stepped = [p for *_, params in self.layers for _, p, _ in params if p.grad is not None]
        if not stepped:
            return
        group_of = {p: g for *_, params in self.layers for _, p, g in params}
        for p in stepped:  # torch's lazy init: the count starts at 0 on a parameter's first step
            if p not in self.expert_steps:
                self.expert_steps[p] = torch.zeros((), dtype=torch.float32, device=_step_device(group_of[p], p))
        grads = {p: p.grad for p in stepped}
        if self._cuda is not None:
            self._cuda.follow_training(grads.values())
        steps = {p: self.expert_steps[p].clone() for p in stepped}  # torch adds 1 before the update, in the call
        for p in stepped:
            self.expert_steps[p].add_(1)  # what each expert's copy reaches
        hyper = {id(g): {k: v for k, v in g.items() if k != "params"} for g in self.param_groups}
        keys = [key for key in self.store.keys() if key in self.local_expert_of]  # MoE-layer (forward) order
        left = {}  # MoE layer -> records still to update in this step
        for m, _ in keys:
            left[m] = left.get(m, 0) + 1

        def update(key, records):
            idx, i = self.local_expert_of[key]
            params = [(name, p, group) for name, p, group in self.layers[idx][3] if p in grads]
            fence = self._update_record(i, params, grads, steps, hyper, records) if params else None
            left[key[0]] -= 1
            if left[key[0]] == 0:  # this layer's weights are final: its forward may run, its gradients go
                for _, p, _ in params:
                    grads.pop(p, None)
                self._release(key[0], self._cuda.mark() if self._cuda is not None else None)
            return fence  # the writer waits on it (CUDA: the record's copy back) before writing the record

        if not self.overlap:
            self.swapper.run(keys, update)
            if self._cuda is not None:
                self._cuda.training_waits()
            return
        self._inflight = _InFlight({m for m in left})
        thread = threading.Thread(target=self._swap_behind, args=(keys, update), name="moe-offload-swap-step",
                                  daemon=True)
        self._inflight.thread = thread
        thread.start()

    def _update_record(self, i, params, grads, steps, hyper, records):
        """AdamW on local expert i's slices of `params`, with its state in `records` (a buffer's views). On CPU the
        views are updated in place; on a GPU the record is copied in, updated and copied back on the swap stream,
        and the returned event (the swapper's fence) marks the copy back."""
        if self._cuda is None:
            self._adam_record(i, params, grads, steps, hyper, records)
            return None
        with self._cuda.context():
            # the host buffers are registered with CUDA (pin_cuda): these copies are asynchronous DMA
            views = {n: v.to(self._cuda.device, non_blocking=True) for n, v in records.items()}
            self._adam_record(i, params, grads, steps, hyper, views)
            for n, v in records.items():
                v.copy_(views[n], non_blocking=True)
            return self._cuda.mark()

    def _adam_record(self, i, params, grads, steps, hyper, views) -> None:
        by_group: Dict[int, Tuple[dict, list]] = {}
        for name, p, group in params:
            by_group.setdefault(id(group), (hyper[id(group)], []))[1].append((name, p))
        for group, items in by_group.values():
            self._adam(group, [p[i] for _, p in items], [grads[p][i] for _, p in items],
                       [views[f"{n}.exp_avg"] for n, _ in items], [views[f"{n}.exp_avg_sq"] for n, _ in items],
                       [steps[p].clone() for _, p in items])

    # --------------------------------------------------------------------------- the swap behind the forward
    def _swap_behind(self, keys, update) -> None:
        inflight = self._inflight
        try:
            with torch.no_grad():  # grad mode is per thread
                self.swapper.run(keys, update)
        except BaseException as e:  # noqa: BLE001 - raised on the training thread by the next wait
            inflight.error = e
        finally:
            with inflight.cond:
                inflight.pending.clear()
                inflight.done = True
                inflight.cond.notify_all()

    def _release(self, moe_layer: int, event=None) -> None:
        inflight = self._inflight
        if inflight is not None:  # None: the walk runs inside step(), nobody waits for a layer
            with inflight.cond:
                if event is not None:
                    inflight.events[moe_layer] = event
                inflight.pending.discard(moe_layer)
                inflight.cond.notify_all()

    def _wait(self, moe_layer: Optional[int] = None) -> None:
        """Blocks the training thread until MoE layer `moe_layer`'s experts (None: the whole swap, writes included)
        are stepped; raises the swap's error, if it failed, here."""
        inflight = self._inflight
        if inflight is None:
            return
        t = time.perf_counter()
        with inflight.cond:
            inflight.cond.wait_for(lambda: inflight.done if moe_layer is None else moe_layer not in inflight.pending)
        if moe_layer is None or inflight.done:
            inflight.thread.join()
            self._inflight = None
        if self._cuda is not None:  # the training stream waits for the updates on the swap stream, not the host
            self._cuda.training_waits(None if self._inflight is None else inflight.events.get(moe_layer))
        self.swapper.stats.stall_s += time.perf_counter() - t
        if inflight.error is not None:  # set before `done`: the walk is over and _inflight already cleared
            raise inflight.error

    def synchronize(self) -> None:
        """Waits for an expert step still running behind the training thread (every update and write-back done);
        raises its error. A no-op without overlap."""
        self._wait(None)

    def zero_grad(self, set_to_none: bool = True):
        # an expert step in flight holds its own references to the gradients it reads: the parameters let go of
        # theirs (never zeroed in place, which would change the update)
        if self._inflight is not None:
            for *_, params in self.layers:
                for _, p, _ in params:
                    p.grad = None
        super().zero_grad(set_to_none=set_to_none)

    @staticmethod
    def _adam(group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        """torch's functional Adam with the group's settings, as torch.optim.AdamW.step calls it."""
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=group["amsgrad"], has_complex=False,
             beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
             differentiable=group["differentiable"], fused=group["fused"], grad_scale=None, found_inf=None,
             decoupled_weight_decay=group["decoupled_weight_decay"])

    # ------------------------------------------------------------------------------------------ checkpoints
    def expert_state(self, moe_layer: int, expert: int) -> Dict[str, dict]:
        """The Adam state of global expert `expert` of MoE layer `moe_layer` as a checkpoint's per-expert file
        holds it: {parameter name in the layer: {"step", "exp_avg", "exp_avg_sq"}} (empty before the first step)."""
        self.synchronize()
        idx, _ = self.local_expert_of[(moe_layer, expert)]
        params = [(n, p) for n, p, _ in self.layers[idx][3] if p in self.expert_steps]
        if not params:
            return {}
        tensors = self.swapper.read((moe_layer, expert))
        return {n: {"step": self.expert_steps[p].clone(), "exp_avg": tensors[f"{n}.exp_avg"].to(p.device),
                    "exp_avg_sq": tensors[f"{n}.exp_avg_sq"].to(p.device)} for n, p in params}

    def load_expert_state(self, moe_layer: int, expert: int, state: Dict[str, dict]) -> None:
        """Writes a checkpoint's per-expert Adam state (keyed as expert_state returns it) into the store; the
        step counts are taken from it. Parameters missing from `state` start from zeros (as torch would)."""
        self.synchronize()
        idx, _ = self.local_expert_of[(moe_layer, expert)]
        params = self.layers[idx][3]
        tensors = {}
        for n, p, group in params:
            st = state.get(n)
            for k in STATE_KEYS:
                tensors[f"{n}.{k}"] = st[k].cpu() if st else torch.zeros(p.shape[1:], dtype=p.dtype)
            if st:
                self.expert_steps[p] = st["step"].to(device=_step_device(group, p), dtype=torch.float32).clone()
        self.swapper.write((moe_layer, expert), tensors)

    def close(self) -> None:
        """Waits for a step in flight (its error is dropped: close runs on the way out, also of a failure), removes
        the forward hooks and releases the store's lock (the run is over; another process may use the directory)."""
        try:
            self.synchronize()
        except BaseException:  # noqa: BLE001 - already on the way out; the first error is what is reported
            pass
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self, "swapper", None) is not None:
            self.swapper.close()  # CUDA: unregisters the swap buffers
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def take_stats(self):
        """moe.offload.swap.SwapStats since the last call (the log line)."""
        return self.swapper.stats.take()


class OffloadAdamWOptimizer(AdamWOptimizer):
    """The MegatronOptimizer over an ExpertOffloadAdamW: the plain data-parallel phases, with the expert Adam state
    in the offload store (checkpoints read and write it one expert at a time through the expert-state hooks) and
    an expert step that may still run behind the training thread (`synchronize`)."""

    offloads_expert_state = True

    def __init__(self, model: torch.nn.Module, cfg, offload: OptimizerOffloadConfig, groups=None, rank: int = 0,
                 world_size: int = 1):
        # the kernel adamw() would pick (probed, not tried: building the offloaded optimizer opens its store)
        inner = ExpertOffloadAdamW(param_groups(model, cfg.weight_decay), model=model, offload=offload, rank=rank,
                                   world_size=world_size, **kernel(next(model.parameters())), **hyper(cfg))
        MegatronOptimizer.__init__(self, inner, model, cfg, groups)

    def synchronize(self) -> None:
        self.optimizer.synchronize()

    def close(self) -> None:
        self.optimizer.close()
        super().close()

    def take_stats(self):
        return self.optimizer.take_stats()

    def expert_state(self, moe_layer: int, expert: int) -> Dict[str, dict]:
        return self.optimizer.expert_state(moe_layer, expert)

    def load_expert_state(self, moe_layer: int, expert: int, state: Dict[str, dict]) -> None:
        self.optimizer.load_expert_state(moe_layer, expert, state)
