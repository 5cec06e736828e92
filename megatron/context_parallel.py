"""Context parallelism (--context-parallel-size N, Megatron-LM's CP): each sequence is split over the N ranks of a
CP group for the whole model; attention all-gathers keys and values (torchtitan's / Megatron-LM's all-gather CP;
a ring would overlap the transfers, the arithmetic is the same). Backward of the gather: one reduce-scatter.

Causal load balancing: the sequence is cut into 2N equal chunks and CP rank i keeps chunks i and 2N-1-i, so every
rank holds as many early (cheap) as late (expensive) queries of the causal mask.

Layout of the pieces (all in this module, used by megatron/model):
- `local_indices`: the positions of this rank's tokens (chunks i and 2N-1-i), in that order;
- `gather_sequence`: [b, ..., s/N, ...] chunks of every CP rank -> the whole sequence in natural order (autograd:
  backward reduce-scatters, so a key/value gradient from every rank's queries reaches the rank that owns it, or
  takes this rank's chunk when the gradient is already complete, as for the per-token loss);
- `finalize_model_grads`: after the backward, sums the partial gradients CP and sequence parallelism leave (every
  parameter over CP: each rank saw its own tokens; the parameters marked sequence_parallel over TP).
"""
from typing import Optional

import torch
import torch.distributed as dist

from megatron.tensor_parallel.layers import allreduce_sequence_parallel_grads, sum_grads_over
from megatron.tensor_parallel.mappings import reduce_scatter_along_dim, tp_rank, tp_size


def local_indices(seq_len: int, rank: int, size: int, device=None) -> torch.Tensor:
    """Positions [s/N] of CP rank `rank`'s tokens: chunk `rank`, then chunk 2N-1-rank, of 2N equal chunks."""
    chunk = seq_len // (2 * size)
    if chunk * 2 * size != seq_len:
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x --context-parallel-size ({size})")
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat((first, second))


def natural_order(seq_len: int, size: int, device=None) -> torch.Tensor:
    """The permutation taking the concatenation [rank 0's tokens, rank 1's, ...] to positions 0..s-1."""
    cat = torch.cat([local_indices(seq_len, r, size, device) for r in range(size)])
    return torch.argsort(cat)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad):
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        n = tp_size(group)
        full = _all_gather(x, dim, group)
        perm = natural_order(x.shape[dim] * n, n, x.device)
        ctx.save_for_backward(perm)
        return full.index_select(dim, perm)

    @staticmethod
    def backward(ctx, grad):
        (perm,) = ctx.saved_tensors
        n, dim = tp_size(ctx.group), ctx.dim
        cat = torch.empty_like(grad).index_copy_(dim, perm, grad)  # back to [rank 0's, rank 1's, ...] order
        if ctx.reduce_grad:  # gradients from every rank's consumers: summed, this rank's part (one reduce-scatter)
            return reduce_scatter_along_dim(cat, ctx.group, dim), None, None, None
        return cat.chunk(n, dim=dim)[tp_rank(ctx.group)].contiguous(), None, None, None


def gather_sequence(x: torch.Tensor, dim: int, group, reduce_grad: bool = True) -> torch.Tensor:
    """This rank's load-balanced chunk pair along `dim` -> the whole sequence in natural order on every CP rank.
    reduce_grad: the backward sums the gradient over the group before taking this rank's part (keys/values read by
    every rank's queries); False: the gradient is already complete on every rank (the gathered per-token loss)."""
    if tp_size(group) == 1:
        return x
    return _GatherSequence.apply(x, dim, group, reduce_grad)


def finalize_model_grads(model: torch.nn.Module, groups) -> None:
    """Sums what CP and SP leave partial, before the data-parallel reduction (both are sums: order-free)."""
    if groups is None:
        return
    if getattr(groups, "sequence_parallel", False):
        allreduce_sequence_parallel_grads(model, groups.tp_group)
    cp_group: Optional[object] = getattr(groups, "cp_group", None)
    if cp_group is None or tp_size(cp_group) == 1:
        return
    # experts on the folded grid (issue 27) are not CP replicas: their expert-DP group spans the CP ranks instead
    sum_grads_over([p for p in model.parameters() if p.requires_grad and not getattr(p, "expert_folded", False)],
                   cp_group)
