"""Global gradient-norm clipping where expert parameters live on different expert-parallel ranks."""
from typing import Iterable, Optional

import torch
import torch.distributed as dist


def clip_grad_norm(dense_params: Iterable[torch.nn.Parameter], expert_params: Iterable[torch.nn.Parameter],
                   max_norm: float, ep_group=None) -> float:
    """Clips all grads by the global L2 norm; returns the norm before clipping.

    Dense grads are identical on every rank after the DP all-reduce, so their norm is local. Each EP rank
    holds different experts: their squared norms are summed over the EP group (communicates on ep_group).
    """
    dense = [p.grad for p in dense_params if p.grad is not None]
    expert = [p.grad for p in expert_params if p.grad is not None]
    device = (dense or expert)[0].device if (dense or expert) else torch.device("cpu")
    sq = torch.zeros((), device=device, dtype=torch.float32)
    if dense:
        sq = sq + torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in dense])) ** 2
    esq = torch.zeros((), device=device, dtype=torch.float32)
    if expert:
        esq = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in expert])) ** 2
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(esq, group=ep_group)
    total = torch.sqrt(sq + esq)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = dense + expert
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return float(total)
