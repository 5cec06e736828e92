"""The one global gradient-norm helper: squared norms of gradient parts, each summed over the process groups that
hold its other pieces, then one clip coefficient for all of them."""
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

ExpertBucket = Tuple[Iterable[torch.nn.Parameter], Optional[object]]  # (expert params, their EP group)
# (gradient tensors, the groups their squared norm is all-reduced over, in order; None entries are skipped)
NormPart = Tuple[List[torch.Tensor], Sequence[Optional[object]]]


def global_grad_norm(parts: Sequence[NormPart], device=None, across=None) -> torch.Tensor:
    """sqrt(sum over parts of the part's squared L2 norm summed over its groups): a 0-dim fp32 tensor.

    Communication: one all_reduce per (part, group with more than one rank), in the order given, so every rank must
    pass the same parts in the same order (even a part with no gradients on this rank: it contributes zero); then,
    with `across` (the pipeline group: each stage holds other layers), one all_reduce of the total's square.
    """
    if device is None:
        device = next((g.device for grads, _ in parts for g in grads), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float32, device=device)
    for grads, groups in parts:
        sq = _sq_norm(grads, device)
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        total = total + sq
    if across is not None and dist.get_world_size(across) > 1:
        dist.all_reduce(total, group=across)
    return torch.sqrt(total)


def clip_grads_(grads: List[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scales `grads` in place by min(1, max_norm / (total_norm + 1e-6)); max_norm <= 0 leaves them."""
    if max_norm > 0 and grads:
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))


def clip_grad_norm(dense_params: Iterable[torch.nn.Parameter],
                   expert_params: Union[Iterable[torch.nn.Parameter], Sequence[ExpertBucket]],
                   max_norm: float, ep_group=None) -> float:
    """Clips all grads by the global L2 norm; returns the norm before clipping (a parameter-list front end of
    `global_grad_norm`, for callers without a MegatronOptimizer).

    Args:
        dense_params: replicated parameters; their grads are identical on every rank after the DP
            all-reduce, so their squared norm is local.
        expert_params: either expert parameters that all share `ep_group`, or (params, ep_group) pairs,
            one per expert-parallel size (per-layer EP sizes: PR-MoE). Each EP rank holds different
            experts, so each pair's squared norm is summed over its own EP group; summing every pair over
            one group would count experts of smaller EP sizes (replicated within that group) several times.
        max_norm: clip threshold; <= 0 only measures.
        ep_group: the EP group of a plain parameter list (None: local, EP size 1).
    Communication: as global_grad_norm, one all_reduce per pair whose group has more than one rank.
    """
    parts: List[NormPart] = [([p.grad for p in dense_params if p.grad is not None], ())]
    parts += [(grads, (group,)) for grads, group in _expert_buckets(expert_params, ep_group)]
    total = global_grad_norm(parts)
    clip_grads_([g for grads, _ in parts for g in grads], total, max_norm)
    return float(total)


def _expert_buckets(expert_params, ep_group) -> List[Tuple[List[torch.Tensor], Optional[object]]]:
    """[(grads, group)]: the given pairs, or one pair of a plain parameter list with `ep_group`."""
    buckets, loose, plain = [], [], False
    for item in expert_params:
        if isinstance(item, tuple):
            params, group = item
            buckets.append(([p.grad for p in params if p.grad is not None], group))
        else:
            plain = True
            if item.grad is not None:
                loose.append(item.grad)
    if plain or not buckets:  # reduce even without local grads: the peers join the same all_reduce
        buckets.append((loose, ep_group))
    return buckets


def _sq_norm(grads: List[torch.Tensor], device) -> torch.Tensor:
    """fp32 squared L2 norm of all `grads` together (0 when there are none)."""
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) ** 2
