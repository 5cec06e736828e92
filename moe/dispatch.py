"""Token permutation to and from experts: the local path and the expert-parallel all-to-all path.

Shape legend: T local tokens, D hidden, K top-k, E experts (global), e local experts (E / ep_size),
N kept (token, choice) pairs this rank sends, R rows this rank's experts receive (from all EP ranks),
P ep_size. Everything is index based (sort by expert + gather/scatter), never a one-hot [T, E, C] einsum,
and only real tokens move: empty capacity slots are neither sent nor computed.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from moe.gating import Routing


# ---- host counts: the one sync -----------------------------------------------------------------------

def counts_to_host(*counts: torch.Tensor) -> List[List[int]]:
    """Several int64 count vectors as host lists, by ONE device->host copy and ONE wait.

    This is the layer's one host sync per micro-batch in dropless or expert-parallel mode (Megatron-LM core does the
    same: a non-blocking copy of the split sizes into pinned memory, then one synchronisation), instead of one
    blocking `.tolist()` per vector. Capacity mode with padding (MoELayer pad_to_capacity) needs none.
    """
    sizes = [c.numel() for c in counts]
    flat = torch.cat([c.reshape(-1).to(torch.int64) for c in counts]) if len(counts) > 1 else \
        counts[0].reshape(-1).to(torch.int64)
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()  # the sync: the split sizes decide the next kernels' shapes
        flat = host
    values = flat.tolist()
    out, start = [], 0
    for n in sizes:
        out.append(values[start:start + n])
        start += n
    return out


# ---- local prep / local post (both paths) -------------------------------------------------------------

def compact_slots(slots_S: torch.Tensor, num_kept: int, num_pairs: int) -> torch.Tensor:
    """[N] kept pairs from assign_slots' [E*C] slot table (sentinel num_pairs = empty), in slot order: grouped by
    expert, by rank within an expert. `num_kept` (= counts_E.sum()) comes from the host counts, so this adds no
    sync; a stable sort moves the empty slots last instead of a boolean mask."""
    empty_S = (slots_S == num_pairs).to(torch.uint8)
    return slots_S.index_select(0, torch.argsort(empty_S, stable=True)[:num_kept])


class _GatherPairs(torch.autograd.Function):
    """rows_ND = x_TD[pair_idx_N // K]; backward scatters into one row per (token, choice) pair and sums
    over K. Every pair index is unique, so backward is a plain copy, not an atomic/accumulating
    index_add (which is ~5x slower on CPU). With `padded`, pair_idx_N is a slot table whose sentinel P marks empty
    slots: they read some real row (their outputs are discarded and their gradients are zero) and their backward
    rows land in one extra discarded row."""

    @staticmethod
    def forward(ctx, x_TD, pair_idx_N, k: int, padded: bool):
        ctx.save_for_backward(pair_idx_N)
        ctx.k, ctx.num_tokens, ctx.padded = k, x_TD.shape[0], padded
        num_pairs = x_TD.shape[0] * k
        src_N = pair_idx_N.clamp(max=max(num_pairs - 1, 0)) if padded else pair_idx_N
        return x_TD.index_select(0, src_N // k if k > 1 else src_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (pair_idx_N,) = ctx.saved_tensors
        num_pairs = ctx.num_tokens * ctx.k
        if ctx.padded:
            grad_PD = grad_ND.new_zeros(num_pairs + 1, grad_ND.shape[1]).index_put_(
                (pair_idx_N,), grad_ND, accumulate=True)[:num_pairs]
        else:
            grad_PD = _scatter_rows(grad_ND, pair_idx_N, num_pairs)
        if ctx.k > 1:
            grad_PD = grad_PD.view(ctx.num_tokens, ctx.k, grad_PD.shape[1]).sum(dim=1)
        return grad_PD, None, None, None


class _ScatterPairs(torch.autograd.Function):
    """rows_PD[pair_idx_N] = y_ND, zero rows for dropped pairs; backward is the gather. With `padded` (a slot
    table), empty slots' rows go to one extra discarded row and get zero gradient."""

    @staticmethod
    def forward(ctx, y_ND, pair_idx_N, num_pairs: int, padded: bool):
        ctx.save_for_backward(pair_idx_N)
        ctx.num_pairs, ctx.padded = num_pairs, padded
        if padded:
            return y_ND.new_zeros(num_pairs + 1, y_ND.shape[1]).index_put_((pair_idx_N,), y_ND,
                                                                         accumulate=True)[:num_pairs]
        return _scatter_rows(y_ND, pair_idx_N, num_pairs)

    @staticmethod
    def backward(ctx, grad_PD):
        (pair_idx_N,) = ctx.saved_tensors
        if not ctx.padded:
            return grad_PD.index_select(0, pair_idx_N), None, None, None
        grad_ND = grad_PD.index_select(0, pair_idx_N.clamp(max=max(ctx.num_pairs - 1, 0)))
        return grad_ND.masked_fill_((pair_idx_N >= ctx.num_pairs).unsqueeze(1), 0), None, None, None


def _scatter_rows(rows_ND: torch.Tensor, pair_idx_N: torch.Tensor, num_pairs: int) -> torch.Tensor:
    if rows_ND.shape[0] == num_pairs:  # nothing dropped: every row is written, no zero fill needed
        out_PD = rows_ND.new_empty(num_pairs, rows_ND.shape[1])
    else:
        out_PD = rows_ND.new_zeros(num_pairs, rows_ND.shape[1])
    return out_PD.index_copy_(0, pair_idx_N, rows_ND)


def permute_tokens(x_TD: torch.Tensor, routing: Routing, pair_idx_N: Optional[torch.Tensor] = None,
                   padded: bool = False) -> torch.Tensor:
    """Gather the pairs' token rows, grouped by expert. pair_idx_N: the kept pairs (default routing.pair_idx_N,
    the dropless order), or with `padded` the [E*C] slot table (rows of empty slots are filler)."""
    pair_idx_N = routing.pair_idx_N if pair_idx_N is None else pair_idx_N
    return _GatherPairs.apply(x_TD, pair_idx_N, routing.expert_TK.shape[1], padded)


def unpermute_tokens(y_ND: torch.Tensor, routing: Routing, num_tokens: int,
                     pair_idx_N: Optional[torch.Tensor] = None, padded: bool = False) -> torch.Tensor:
    """Weight each expert output by its gate and sum a token's K outputs; dropped pairs contribute 0.
    pair_idx_N / padded: as given to permute_tokens."""
    k = routing.expert_TK.shape[1]
    pair_idx_N = routing.pair_idx_N if pair_idx_N is None else pair_idx_N
    y_PD = _ScatterPairs.apply(y_ND, pair_idx_N, num_tokens * k, padded)
    gates_TK = routing.gates_TK.to(y_ND.dtype)
    if k == 1:
        return y_PD * gates_TK
    # [T, 1, K] @ [T, K, D]: the weighted sum without a [T, K, D] product tensor in forward or backward (about 2x
    # faster than multiply-then-sum on CPU at top-8, where this step is memory-bound)
    return torch.bmm(gates_TK.unsqueeze(1), y_PD.view(num_tokens, k, y_ND.shape[1])).squeeze(1)


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


def ep_splits(counts_E: List[int], recv_counts_Pe: List[int], ep_size: int) -> Tuple[List[int], List[int], List[int]]:
    """From the host counts (counts_to_host): (send_splits [P], recv_splits [P], counts_e [e]) in Python.

    send_splits[p]: rows this rank sends to rank p (its experts' counts summed); recv_splits[p]: rows it receives
    from rank p; counts_e[j]: rows its local expert j receives from all ranks."""
    e = len(counts_E) // ep_size
    send_splits = [sum(counts_E[p * e:(p + 1) * e]) for p in range(ep_size)]
    recv_splits = [sum(recv_counts_Pe[p * e:(p + 1) * e]) for p in range(ep_size)]
    counts_e = [sum(recv_counts_Pe[p * e + j] for p in range(ep_size)) for j in range(e)]
    return send_splits, recv_splits, counts_e


def dispatch_ep(tokens_ND: torch.Tensor, send_splits: List[int], recv_splits: List[int], group) -> torch.Tensor:
    """Send each rank the rows for its experts; returns recv_RD, ordered by (source rank, local expert).

    tokens_ND is grouped by global expert, and experts of rank p are ids [p*e, (p+1)*e), so the rows for
    rank p are one contiguous block. Splits from ep_splits.
    """
    return all_to_all(tokens_ND, recv_splits, send_splits, group)


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

    Returns (rows_RD, (order_R, inverse_R) or None when no reorder is needed). Sizes from recv_RD's shape: no sync.
    """
    ep_size, num_local = recv_counts_Pe.shape
    if num_local == 1:  # one local expert: rows are already grouped
        return recv_RD, None
    block_expert_B = torch.arange(num_local, device=recv_counts_Pe.device).repeat(ep_size)
    expert_R = torch.repeat_interleave(block_expert_B, recv_counts_Pe.reshape(-1), output_size=recv_RD.shape[0])
    order_R = torch.argsort(expert_R, stable=True)
    inverse_R = torch.empty_like(order_R)
    inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    return _PermuteRows.apply(recv_RD, order_R, inverse_R), (order_R, inverse_R)


def regroup_by_source_rank(y_RD: torch.Tensor, perm) -> torch.Tensor:
    """Inverse of group_by_local_expert: put rows back in (source rank, local expert) order."""
    if perm is None:
        return y_RD
    order_R, inverse_R = perm
    return _PermuteRows.apply(y_RD, inverse_R, order_R)


def combine_ep(y_RD: torch.Tensor, send_splits: List[int], recv_splits: List[int], group) -> torch.Tensor:
    """Return expert outputs to the ranks that own the tokens (reverse of dispatch_ep)."""
    return all_to_all(y_RD, send_splits, recv_splits, group)


# ---- token de-duplication over TP, and expert tensor parallelism (the folded expert grid) --------------------
# Q = ETP size. Under tensor parallelism without sequence parallelism every TP rank holds the same T tokens: each
# dispatches only its slice (token_slice) and the outputs are all-gathered back. Under ETP every rank of the ETP
# group computes a slice of each expert's FFN for the rows of all of them: rows go to every peer (a variable-size
# all-gather written as one all_to_all_single) and the partial outputs come back to their owner and are summed (the
# matching reduce-scatter).

def token_slice(num_tokens: int, size: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of rank's slice of num_tokens tokens cut into `size` pieces of ceil(T / size) (the last ones
    may be shorter or empty)."""
    per = -(-num_tokens // size)
    start = min(rank * per, num_tokens)
    return start, min(start + per, num_tokens)


def _gather_padded(x: torch.Tensor, num_rows: int, group) -> torch.Tensor:
    """Every rank's [n_r, ...] piece (n_r from token_slice) -> the [num_rows, ...] concatenation on every rank."""
    size = group.size()
    per = -(-num_rows // size)
    padded = x.new_zeros((per,) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    spans = [token_slice(num_rows, size, r) for r in range(size)]
    return torch.cat([part[:stop - start] for part, (start, stop) in zip(parts, spans)])


class _SliceTokens(torch.autograd.Function):
    """x[start:stop] of tokens every rank of `group` holds alike; backward all-gathers the slices' gradients (each
    rank's consumers saw only its slice), so every rank gets the whole, equal gradient."""

    @staticmethod
    def forward(ctx, x, start: int, stop: int, group):
        ctx.num_rows, ctx.group = x.shape[0], group
        return x[start:stop].clone()

    @staticmethod
    def backward(ctx, grad):
        return _gather_padded(grad, ctx.num_rows, ctx.group), None, None, None


class _GatherTokens(torch.autograd.Function):
    """Each rank's slice -> all slices on every rank; backward keeps this rank's slice of the (equal) gradient."""

    @staticmethod
    def forward(ctx, x, num_rows: int, start: int, stop: int, group):
        ctx.span = (start, stop)
        return _gather_padded(x, num_rows, group)

    @staticmethod
    def backward(ctx, grad):
        start, stop = ctx.span
        return grad[start:stop].contiguous(), None, None, None, None


def slice_tokens(x: torch.Tensor, start: int, stop: int, group) -> torch.Tensor:
    """This TP rank's token rows [start, stop) (differentiable; see _SliceTokens)."""
    return _SliceTokens.apply(x, start, stop, group)


def gather_tokens(x: torch.Tensor, num_rows: int, start: int, stop: int, group) -> torch.Tensor:
    """The TP ranks' token slices concatenated on every rank (differentiable; see _GatherTokens)."""
    return _GatherTokens.apply(x, num_rows, start, stop, group)


def slice_candidates(routing: Routing, start: int, stop: int):
    """(candidates, mine, counts_E) for the tokens [start, stop): the routing's pair list or slot table, which of its
    entries are kept pairs of those tokens, and how many per expert (device tensors: no sync)."""
    k, num_experts = routing.expert_TK.shape[1], routing.counts_E.shape[0]
    cand = routing.pair_idx_N
    mine = (cand >= start * k) & (cand < stop * k)
    if routing.capacity is None:  # dropless: every pair kept
        chosen = routing.expert_TK[start:stop].reshape(-1)  # (not bincount: on CUDA it syncs to size its output)
        counts_E = torch.zeros(num_experts, dtype=torch.int64, device=chosen.device).scatter_add_(
            0, chosen, torch.ones_like(chosen, dtype=torch.int64))
    else:  # the [E*C] slot table, empty slots hold T*K (outside every slice)
        counts_E = mine.view(num_experts, -1).sum(dim=1)
    return cand, mine, counts_E


def mine_pairs(cand: torch.Tensor, mine: torch.Tensor, num_mine: int, start: int, k: int) -> torch.Tensor:
    """The [n] kept pairs of this slice, grouped by expert, as indices into the slice's [T_slice * K] pairs
    (num_mine from the host counts, so no sync: a stable sort moves the others last)."""
    order = torch.argsort((~mine).to(torch.uint8), stable=True)[:num_mine]
    return cand.index_select(0, order) - start * k


def etp_gather_counts(counts_e: torch.Tensor, group) -> torch.Tensor:
    """[Q, e] rows every ETP peer holds for each local expert (an all_gather of fixed size: no sync)."""
    parts = [torch.empty_like(counts_e) for _ in range(group.size())]
    dist.all_gather(parts, counts_e.contiguous(), group=group)
    return torch.stack(parts)


def etp_gather_rows(rows_RD: torch.Tensor, peer_rows: List[int], group) -> torch.Tensor:
    """Every ETP peer's rows, concatenated in peer order (this rank's R rows sent to each peer; backward sums the
    peers' gradients of this rank's rows). peer_rows[q]: rows peer q holds."""
    q = group.size()
    return all_to_all(rows_RD.repeat(q, 1), list(peer_rows), [rows_RD.shape[0]] * q, group)


def etp_reduce_rows(partial_MD: torch.Tensor, peer_rows: List[int], num_rows: int, group) -> torch.Tensor:
    """Inverse of etp_gather_rows for the outputs: each peer's partial sums of this rank's rows come back and are
    added (in fp32, then the compute dtype): the ETP partial-sum reduction (a reduce-scatter of variable sizes)."""
    q = group.size()
    back = all_to_all(partial_MD, [num_rows] * q, list(peer_rows), group)
    return back.view(q, num_rows, back.shape[-1]).float().sum(dim=0).to(partial_MD.dtype)
