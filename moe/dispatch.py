"""Token permutation to and from experts: the local path and the expert-parallel all-to-all path.

Shape legend: T local tokens, D hidden, K top-k, E experts (global), e local experts (E / ep_size),
N kept (token, choice) pairs this rank sends, R rows this rank's experts receive (from all EP ranks),
P ep_size. Everything is index based (sort by expert + gather/scatter), never a one-hot [T, E, C] einsum,
and only real tokens move: empty capacity slots are neither sent nor computed.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

from moe.gating import Routing


# ---- local prep / local post (both paths) -------------------------------------------------------------

class _GatherPairs(torch.autograd.Function):
    """rows_ND = x_TD[pair_idx_N // K]; backward scatters into one row per (token, choice) pair and sums
    over K. Every pair index is unique, so backward is a plain copy, not an atomic/accumulating
    index_add (which is ~5x slower on CPU)."""

    @staticmethod
    def forward(ctx, x_TD, pair_idx_N, k: int):
        ctx.save_for_backward(pair_idx_N)
        ctx.k, ctx.num_tokens = k, x_TD.shape[0]
        return x_TD.index_select(0, pair_idx_N // k if k > 1 else pair_idx_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (pair_idx_N,) = ctx.saved_tensors
        grad_PD = _scatter_rows(grad_ND, pair_idx_N, ctx.num_tokens * ctx.k)
        if ctx.k > 1:
            grad_PD = grad_PD.view(ctx.num_tokens, ctx.k, grad_PD.shape[1]).sum(dim=1)
        return grad_PD, None, None


class _ScatterPairs(torch.autograd.Function):
    """rows_PD[pair_idx_N] = y_ND, zero rows for dropped pairs; backward is the gather."""

    @staticmethod
    def forward(ctx, y_ND, pair_idx_N, num_pairs: int):
        ctx.save_for_backward(pair_idx_N)
        return _scatter_rows(y_ND, pair_idx_N, num_pairs)

    @staticmethod
    def backward(ctx, grad_PD):
        (pair_idx_N,) = ctx.saved_tensors
        return grad_PD.index_select(0, pair_idx_N), None, None


def _scatter_rows(rows_ND: torch.Tensor, pair_idx_N: torch.Tensor, num_pairs: int) -> torch.Tensor:
    if rows_ND.shape[0] == num_pairs:  # nothing dropped: every row is written, no zero fill needed
        out_PD = rows_ND.new_empty(num_pairs, rows_ND.shape[1])
    else:
        out_PD = rows_ND.new_zeros(num_pairs, rows_ND.shape[1])
    return out_PD.index_copy_(0, pair_idx_N, rows_ND)


def permute_tokens(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather the kept pairs' token rows, grouped by expert (expert order = routing.pair_idx_N order)."""
    return _GatherPairs.apply(x_TD, routing.pair_idx_N, routing.expert_TK.shape[1])


def unpermute_tokens(y_ND: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
    """Weight each expert output by its gate and sum a token's K outputs; dropped pairs contribute 0."""
    k = routing.expert_TK.shape[1]
    y_PD = _ScatterPairs.apply(y_ND, routing.pair_idx_N, num_tokens * k)
    gates_TK = routing.gates_TK.to(y_ND.dtype)
    if k == 1:
        return y_PD * gates_TK
    return (y_PD.view(num_tokens, k, y_ND.shape[1]) * gates_TK.unsqueeze(-1)).sum(dim=1)


# ---- expert-parallel path -----------------------------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends gradients back along the reverse splits."""

    @staticmethod
    def forward(ctx, x, output_splits: List[int], input_splits: List[int], group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
    """Differentiable variable-size all_to_all_single over `group` (gloo and NCCL alike)."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(counts_E: torch.Tensor, group) -> torch.Tensor:
    """Tell every EP rank how many rows it will receive; returns recv_counts_Pe.

    recv_counts_Pe[p, j] = rows that rank p sends to this rank's local expert j. Only these counts are
    exchanged: no capacity or maximum is agreed globally, so ranks routing differently cannot hang.
    """
    ep_size = group.size()
    send_E = counts_E.to(torch.int64).contiguous()
    recv_E = torch.empty_like(send_E)
    dist.all_to_all_single(recv_E, send_E, group=group)
    return recv_E.view(ep_size, -1)


def dispatch_ep(tokens_ND: torch.Tensor, counts_E: torch.Tensor, recv_counts_Pe: torch.Tensor, group
                ) -> Tuple[torch.Tensor, List[int], List[int]]:
    """Send each rank the rows for its experts; returns (recv_RD, send_splits, recv_splits).

    tokens_ND is grouped by global expert, and experts of rank p are ids [p*e, (p+1)*e), so the rows for
    rank p are one contiguous block. recv_RD is ordered by (source rank, local expert).
    """
    ep_size = group.size()
    send_splits = counts_E.view(ep_size, -1).sum(dim=1).tolist()
    recv_splits = recv_counts_Pe.sum(dim=1).tolist()
    return all_to_all(tokens_ND, recv_splits, send_splits, group), send_splits, recv_splits


class _PermuteRows(torch.autograd.Function):
    """rows[order]; backward is the inverse permutation (a gather), not index_select's scatter-add."""

    @staticmethod
    def forward(ctx, x_RD, order_R, inverse_R):
        ctx.save_for_backward(inverse_R)
        return x_RD.index_select(0, order_R)

    @staticmethod
    def backward(ctx, grad_RD):
        (inverse_R,) = ctx.saved_tensors
        return grad_RD.index_select(0, inverse_R), None, None


def group_by_local_expert(recv_RD: torch.Tensor, recv_counts_Pe: torch.Tensor):
    """Reorder received rows from (source rank, local expert) to (local expert, source rank) order.

    Returns (rows_RD, counts_e as a list, (order_R, inverse_R) or None when no reorder is needed).
    """
    ep_size, num_local = recv_counts_Pe.shape
    counts_e = recv_counts_Pe.sum(dim=0).tolist()
    if num_local == 1:  # one local expert: rows are already grouped
        return recv_RD, counts_e, None
    block_expert_B = torch.arange(num_local, device=recv_counts_Pe.device).repeat(ep_size)
    expert_R = torch.repeat_interleave(block_expert_B, recv_counts_Pe.reshape(-1), output_size=recv_RD.shape[0])
    order_R = torch.argsort(expert_R, stable=True)
    inverse_R = torch.empty_like(order_R)
    inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    return _PermuteRows.apply(recv_RD, order_R, inverse_R), counts_e, (order_R, inverse_R)


def regroup_by_source_rank(y_RD: torch.Tensor, perm) -> torch.Tensor:
    """Inverse of group_by_local_expert: put rows back in (source rank, local expert) order."""
    if perm is None:
        return y_RD
    order_R, inverse_R = perm
    return _PermuteRows.apply(y_RD, inverse_R, order_R)


def combine_ep(y_RD: torch.Tensor, send_splits: List[int], recv_splits: List[int], group) -> torch.Tensor:
    """Return expert outputs to the ranks that own the tokens (reverse of dispatch_ep)."""
    return all_to_all(y_RD, send_splits, recv_splits, group)
