"""Gradient synchronisation over data-parallel and expert-data-parallel ranks, and the grouping of parameters
whose squared gradient norms are summed over tensor- or expert-parallel groups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron.parallel_state import ParallelGroups
from megatron.tensor_parallel import is_tensor_parallel_param
from moe.experts import is_expert_param


@dataclass
class ParamSplit:
    """A model's parameters by how they are synchronised (each list in model order)."""

    dense: List[torch.nn.Parameter]  # replicated over DP: gradients averaged over the DP group
    expert: List[torch.nn.Parameter]  # owned by EP ranks: summed over expert-DP, divided by DP
    tp: List[torch.nn.Parameter]  # dense and sharded over TP: norm summed over the TP group
    replicated: List[torch.nn.Parameter]  # dense and whole on every TP rank: norm counted once


def split_params(model: torch.nn.Module) -> ParamSplit:
    params = list(model.parameters())
    dense = [p for p in params if not is_expert_param(p)]
    return ParamSplit(dense=dense, expert=[p for p in params if is_expert_param(p)],
                      tp=[p for p in dense if is_tensor_parallel_param(p)],
                      replicated=[p for p in dense if not is_tensor_parallel_param(p)])


def allreduce_grads(params: List[torch.nn.Parameter], group, divisor: int) -> None:
    """Sums grads over `group` in one flat buffer per dtype (no communication for None or a 1-rank group), then
    divides by `divisor`."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if group is not None and dist.get_world_size(group) > 1:
        by_dtype: Dict[torch.dtype, list] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for gs in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(gs)
            dist.all_reduce(flat, group=group)
            for g, synced in zip(gs, torch._utils._unflatten_dense_tensors(flat, gs)):
                g.copy_(synced)
    if divisor != 1:
        torch._foreach_div_(grads, float(divisor))


def by_ep_size(expert_params: List[torch.nn.Parameter]) -> Dict[int, List[torch.nn.Parameter]]:
    """Expert parameters keyed by the EP size of their layer (p.ep_size, set by MoELayer; PR-MoE has several)."""
    out: Dict[int, List[torch.nn.Parameter]] = {}
    for p in expert_params:
        out.setdefault(getattr(p, "ep_size", 1), []).append(p)
    return out


def reduce_gradients(split: ParamSplit, groups: ParallelGroups) -> None:
    """Dense grads: mean over DP. Expert grads: sum over expert-DP, divided by the DP size (not expert-DP's).

    Each rank's loss is the mean over its own tokens, so the global loss is the mean over DP ranks. An
    expert's grad on its owner rank already sums the contributions of every EP peer's tokens (the
    all-to-all backward brings them); summing over the expert-DP replicas then covers all DP ranks, and
    dividing by DP turns the sum of per-rank means into the global mean.
    Communication: one all-reduce per dtype over the DP group, and per EP size over its expert-DP group.
    On the folded expert grid (parallel_state) the expert-DP group spans TP and CP ranks as well (each holds other
    tokens of the batch: TP slices after de-duplication, CP chunks): the same sum over it, divided by DP.
    """
    allreduce_grads(split.dense, groups.dp_group, groups.dp_size)
    for ep, ps in by_ep_size(split.expert).items():
        allreduce_grads(ps, _expert_dp(groups, ep), groups.dp_size)


def _expert_dp(groups: ParallelGroups, ep: int):
    """The group expert gradients of EP size `ep` are summed over (may span TP ranks: token de-duplication)."""
    return groups.expert_dp_group(ep)


def norm_groups(split: ParamSplit, groups: ParallelGroups) -> List[Tuple[list, object]]:
    """[(params, the group their squared grad norm is summed over)], the same order on every rank: the
    tensor-parallel shards with the TP group, then the experts of each EP size with that size's EP group.

    Per-layer EP sizes (PR-MoE): each size's experts are split over its own EP group, so clip_grad_norm sums
    each size's squared norm over that group only. Parameters replicated over TP (LayerNorms, row-parallel
    biases, MoE layers) have equal grads on every TP rank and are counted once (split.replicated).
    On the folded expert grid each EP size's experts are summed over its ETP x EP group (expert_norm_group).
    """
    out = [(split.tp, groups.tp_group if groups.tp_size > 1 else None)]
    experts = by_ep_size(split.expert)
    # folded grid: every expert shard once over ETP x EP (ETP shards are disjoint pieces, none replicated)
    return out + [(experts[ep], groups.expert_norm_group(ep)) for ep in sorted(experts)]


class _Bucket:
    """Gradients reduced together: parameters of one dtype and one reduction group, in backward order."""

    def __init__(self, params: List[torch.nn.Parameter], group, divisor: int):
        self.params, self.group, self.divisor = params, group, divisor
        self.pending = len(params)  # parameters whose last-micro-batch gradient is not yet accumulated
        self.work = None  # (flat buffer, async handle, grads) once launched


class OverlappedReducer:
    """--overlap-grad-reduce (Megatron-LM's): the all-reduces of `reduce_gradients` issued from gradient hooks
    while the backward of the last micro-batch still runs, in buckets of about `bucket_size` elements.

    Buckets hold the parameters of one reduction (dense over DP, the experts of each EP size over their expert-DP
    group) and one dtype, in reverse model order (the order the backward produces gradients). A bucket is launched
    (flattened, async all-reduce) when each of its parameters' gradient has been accumulated during a backward
    that `arm()` announced as the last micro-batch's; `finish()` launches what never fired, waits, copies the sums
    back and divides as `reduce_gradients` does. Each element gets the same sum as in `reduce_gradients` (the same
    summands; bit for bit on 2 ranks, where the sum's order cannot differ).
    """

    def __init__(self, split: ParamSplit, groups: ParallelGroups, bucket_size: int):
        families = [(split.dense, groups.dp_group)]
        families += [(ps, _expert_dp(groups, ep)) for ep, ps in by_ep_size(split.expert).items()]
        self.buckets: List[_Bucket] = []
        for params, group in families:
            by_dtype: Dict[torch.dtype, list] = {}
            for p in reversed([p for p in params if p.requires_grad]):
                by_dtype.setdefault(p.dtype, []).append(p)
            for ps in by_dtype.values():
                start, size = 0, 0
                for i, p in enumerate(ps):
                    size += p.numel()
                    if size >= bucket_size or i == len(ps) - 1:
                        self.buckets.append(_Bucket(ps[start:i + 1], group, groups.dp_size))
                        start, size = i + 1, 0
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._armed = False
        self.hook_launches = 0  # buckets launched from a hook, while the backward ran (a count for tests and logs)
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self._bucket_of]

    def arm(self) -> None:
        """The next backward is the last micro-batch's: reduce each bucket as soon as its gradients are final."""
        self._armed = True
        for b in self.buckets:
            b.pending, b.work = len(b.params), None

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        b = self._bucket_of[p]
        b.pending -= 1
        if b.pending == 0:
            self._launch(b)
            self.hook_launches += 1

    @staticmethod
    def _launch(b: _Bucket) -> None:
        grads = [p.grad for p in b.params if p.grad is not None]
        if not grads or b.group is None or dist.get_world_size(b.group) == 1:
            b.work = (None, None, grads)
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        b.work = (flat, dist.all_reduce(flat, group=b.group, async_op=True), grads)

    def finish(self) -> None:
        """Waits for every bucket's all-reduce (launching those whose hooks did not all fire: a parameter without a
        gradient this step) and writes the means into the gradients. Every rank launches the same buckets."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            flat, handle, grads = b.work
            if handle is not None:
                handle.wait()
                for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(synced)
            if grads and b.divisor != 1:
                torch._foreach_div_(grads, float(b.divisor))
            b.work = None
        self._armed = False

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
