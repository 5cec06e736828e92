"""The optimizer interface the training loop and checkpoints use: reduce -> prepare (unscale, overflow) -> clip ->
update, plus state in the checkpoint's gathered layout and the hooks for expert state that lives off the device.

Shape after Megatron-LM's `megatron/core/optimizer/optimizer.py` (`prepare_grads`, `step_with_ready_grads`): the
loop calls `step(scale)` once per iteration after the backward; implementations (adamw.py: plain data parallel,
zero.py: ZeRO-1/2, offload.py: expert Adam state on NVMe) override the phases that differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron import grad_sync
from megatron.config import OptimizerConfig
from megatron.optimizer.clip_grads import NormPart, clip_grads_, global_grad_norm
from megatron.optimizer.grad_scaler import unscale_and_check


@dataclass(frozen=True)
class StepResult:
    """What one `MegatronOptimizer.step` did."""

    stepped: bool  # the parameters were updated
    grad_norm: float  # global L2 norm before clipping; nan after an fp16 overflow
    overflow: bool = False  # fp16: an inf/nan gradient on some rank; the step was skipped (the scaler backs off)
    non_finite: bool = False  # bf16/fp32 with --check-for-nan-in-loss-and-grad: non-finite norm, step refused


class MegatronOptimizer:
    """One training step's optimizer work and the optimizer's state, whatever shards or offloads it.

    Args:
        optimizer: the torch optimizer that performs the update (over the parameters, or ZeRO's shards).
        model: the model the optimizer trains (its parameter names key `state_dict`).
        cfg: --clip-grad and --check-for-nan-in-loss-and-grad are read from it.
        groups: megatron.parallel_state.ParallelGroups, or None for one process (no communication).
    """

    offloads_expert_state = False  # True: expert Adam state is not in `state_dict()`; use expert_state()

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, cfg: OptimizerConfig, groups=None):
        self.optimizer = optimizer
        self.groups = groups
        self.params = grad_sync.split_params(model)
        self.names: Dict[torch.nn.Parameter, str] = {p: n for n, p in model.named_parameters()}
        self.clip_grad = cfg.clip_grad
        self.check_non_finite = cfg.check_for_nan_in_loss_and_grad
        # --overlap-grad-reduce: the reduction issued from gradient hooks during the last micro-batch's backward
        self.reducer = self._overlapped_reducer(cfg) if cfg.overlap_grad_reduce and groups is not None else None

    # ---------------------------------------------------------------------------- the torch surface in use
    @property
    def param_groups(self) -> List[dict]:
        """The groups the LR schedule sets `lr` on (ZeRO: one per shard bucket)."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """The torch optimizer's own state (ZeRO: keyed by shards); `state_dict()` gives the per-parameter view."""
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------------------------------- the step
    def step(self, scale: Optional[float] = None) -> StepResult:
        """After the backward of every micro-batch: reduce the gradients, unscale them (`scale`: the fp16 loss
        scale; None without loss scaling), clip by the global norm, update. Every rank returns the same result."""
        self.reduce_gradients()
        if scale is not None and self.prepare_grads(scale):
            return StepResult(stepped=False, grad_norm=float("nan"), overflow=True)
        norm = self.clip_grad_norm(self.clip_grad)
        if scale is None and self.check_non_finite and not math.isfinite(norm):
            return StepResult(stepped=False, grad_norm=norm, non_finite=True)  # the norm is global: all ranks agree
        self.step_with_ready_grads()
        return StepResult(stepped=True, grad_norm=norm)

    def before_backward(self, last_micro_batch: bool) -> None:
        """Called before each micro-batch's backward; with --overlap-grad-reduce the last one's gradient hooks
        start the reduction (earlier micro-batches only accumulate, as under DDP's no_sync)."""
        if self.reducer is not None and last_micro_batch:
            self.reducer.arm()

    def _overlapped_reducer(self, cfg: OptimizerConfig):
        return grad_sync.OverlappedReducer(self.params, self.groups, cfg.ddp_bucket_size)

    def reduce_gradients(self) -> None:
        """Dense gradients averaged over DP, expert gradients over expert-DP (megatron/grad_sync.py); with
        --overlap-grad-reduce, waits for the reduction the backward started."""
        if self.reducer is not None:
            self.reducer.finish()
        elif self.groups is not None:
            grad_sync.reduce_gradients(self.params, self.groups)

    def main_params(self) -> List[torch.nn.Parameter]:
        """The parameters whose `.grad` the update reads, after `reduce_gradients` (ZeRO-2: the owned shards)."""
        return self.params.dense + self.params.expert

    def prepare_grads(self, scale: float) -> bool:
        """Divides the gradients by the loss scale; returns True when any rank saw an inf/nan (all-reduced MAX)."""
        params = self.main_params()
        found_inf = unscale_and_check(params, scale)
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = params[0].device if params else torch.device("cpu")
            flag = torch.tensor([1.0 if found_inf else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found_inf = bool(flag.item())
        return found_inf

    def norm_parts(self) -> List[NormPart]:
        """The gradients in parts, each with the groups its squared norm is summed over (the same order on every
        rank): TP-replicated dense parameters counted once, TP shards over TP, each EP size's experts over EP."""
        parts = [([p.grad for p in self.params.replicated if p.grad is not None], ())]
        if self.groups is None:
            return parts + [([p.grad for p in self.params.tp + self.params.expert if p.grad is not None], ())]
        return parts + [([p.grad for p in ps if p.grad is not None], (group,))
                        for ps, group in grad_sync.norm_groups(self.params, self.groups)]

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clips the gradients by their global L2 norm (clip_grads.global_grad_norm); returns the norm before."""
        parts = self.norm_parts()
        # pipeline parallelism: the last stage's copy of the tied embedding (the LM head) holds the same summed
        # gradient as the first stage's and is clipped, but counted once (Megatron-LM's param_is_not_shared)
        twice = {id(p.grad) for p in self.main_params() if getattr(p, "pipeline_duplicate", False)}
        counted = [([g for g in grads if id(g) not in twice], groups) for grads, groups in parts] if twice else parts
        total = global_grad_norm(counted, across=getattr(self.groups, "pp_group", None))
        clip_grads_([g for grads, _ in parts for g in grads], total, max_norm)
        return float(total)

    def step_with_ready_grads(self) -> None:
        """The update alone, on gradients already reduced, unscaled and clipped."""
        self.optimizer.step()

    def synchronize(self) -> None:
        """Waits for work still running behind the training thread (an offloaded expert step): before anything
        reads every weight or the optimizer state (checkpoints, evaluation, the end of training)."""

    def close(self) -> None:
        """Releases what the optimizer holds outside the process's memory (an offload store's lock) and removes
        the gradient hooks of --overlap-grad-reduce."""
        if self.reducer is not None:
            self.reducer.remove()

    def take_stats(self):
        """Offload swap statistics since the last call (moe.offload.swap.SwapStats), or None."""
        return None

    # ------------------------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> Dict[str, dict]:
        """{parameter name: {"step", "exp_avg", "exp_avg_sq"}} of whole parameters, as an unsharded AdamW holds
        them ({} for a parameter not yet stepped): the layout checkpoints store. Copies; collective under ZeRO."""
        by_param = self._state_by_param()
        return {n: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in by_param[p].items()}
                for p, n in self.names.items() if by_param.get(p)}

    def load_state_dict(self, state: Dict[str, dict], where: str) -> None:
        """Loads `state_dict()`'s layout (from a checkpoint written at any DP size, with or without ZeRO);
        `where` names the source in errors."""
        by_name = {n: p for p, n in self.names.items()}
        self._load_by_param({by_name[n]: {k: (v.to(by_name[n].device) if torch.is_tensor(v) else v)
                                          for k, v in st.items()} for n, st in state.items() if n in by_name}, where)

    def checkpoint_state(self) -> Dict[str, dict]:
        """`state_dict()`'s layout without copies, for a checkpoint about to be written: ZeRO gathers each bucket
        to the rank that writes it, into CPU memory (other ranks get no entry for it; issue 23, finding 7). Values
        are live views: write or snapshot them before the next step. Collective under ZeRO."""
        by_param = self._state_by_param(writer_only=True)
        return {n: {k: (v.detach() if torch.is_tensor(v) else v) for k, v in by_param[p].items()}
                for p, n in self.names.items() if by_param.get(p)}

    def load_param_state(self, state: Dict[torch.nn.Parameter, dict], where: str) -> None:
        """Installs per-parameter Adam state in the unsharded layout (ZeRO keeps the slice each rank owns)."""
        self._load_by_param(state, where)

    def _state_by_param(self, writer_only: bool = False) -> Dict[torch.nn.Parameter, dict]:
        return self.optimizer.state

    def _load_by_param(self, state: Dict[torch.nn.Parameter, dict], where: str) -> None:
        self.optimizer.state.update(state)

    # ---------------------------------------------------------------- expert state kept off the device
    def expert_state(self, moe_layer: int, expert: int) -> Dict[str, dict]:
        """With `offloads_expert_state`: global expert `expert` of MoE layer `moe_layer`'s Adam state as its
        checkpoint file holds it ({name in the layer: {"step", "exp_avg", "exp_avg_sq"}}); otherwise {} (the
        expert's state is part of `state_dict()`)."""
        return {}

    def load_expert_state(self, moe_layer: int, expert: int, state: Dict[str, dict]) -> None:
        """With `offloads_expert_state`: stores one expert's state (keyed as `expert_state` returns it)."""
        raise NotImplementedError(f"{type(self).__name__} keeps expert state in state_dict()")

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors this rank holds in memory."""
        return sum(v.numel() * v.element_size() for st in self.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v))
