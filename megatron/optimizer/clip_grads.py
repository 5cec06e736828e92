"""Global gradient-norm clipping where expert parameters live on different expert-parallel ranks."""
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

ExpertBucket = Tuple[Iterable[torch.nn.Parameter], Optional[object]]  # (expert params, their EP group)


def clip_grad_norm(dense_params: Iterable[torch.nn.Parameter],
                   expert_params: Union[Iterable[torch.nn.Parameter], Sequence[ExpertBucket]],
                   max_norm: float, ep_group=None) -> float:
    """Clips all grads by the global L2 norm; returns the norm before clipping.

    Args:
        dense_params: replicated parameters; their grads are identical on every rank after the DP
            all-reduce, so their squared norm is local.
        expert_params: either expert parameters that all share `ep_group`, or (params, ep_group) pairs,
            one per expert-parallel size (per-layer EP sizes: PR-MoE). Each EP rank holds different
            experts, so each pair's squared norm is summed over its own EP group; summing every pair over
            one group would count experts of smaller EP sizes (replicated within that group) several times.
        max_norm: clip threshold; <= 0 only measures.
        ep_group: the EP group of a plain parameter list (None: local, EP size 1).
    Communication: one all_reduce per pair whose group has more than one rank, in the order given, so
    every rank must pass the pairs in the same order (even a pair with no grads on this rank).
    """
    dense = [p.grad for p in dense_params if p.grad is not None]
    buckets = _expert_buckets(expert_params, ep_group)
    expert = [g for grads, _ in buckets for g in grads]
    device = (dense or expert)[0].device if (dense or expert) else torch.device("cpu")
    total_sq = _sq_norm(dense, device)
    for grads, group in buckets:
        sq = _sq_norm(grads, device)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        total_sq = total_sq + sq
    total = torch.sqrt(total_sq)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = dense + expert
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
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
