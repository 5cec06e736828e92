"""Softmax statistics over vocab-parallel logits without gathering them (Megatron's _VocabParallelCrossEntropy).

Each rank holds logits [N, V/tp] for its vocabulary slice. A softmax over the whole vocabulary needs two
collectives per row: the max (all-reduce MAX) and the sums (all-reduce SUM); everything else is local.
`chunked_row_passes_` is that skeleton, run in row chunks small enough to stay in cache, and is the one place the
fused losses share: `vocab_parallel_softmax_grad_` (cross entropy, here) and the fused distillation loss
(megatron/model/fused_lm_loss.py) each only say what to reduce per chunk and what to write back.
"""
from typing import Callable, Tuple

import torch
import torch.distributed as dist

from megatron.tensor_parallel.mappings import tp_rank, tp_size

_CHUNK_ROWS = 16  # rows per pass over the [N, V/tp] buffer: cache resident while its passes run

RowFn = Callable[..., torch.Tensor]


def chunked_row_passes_(n: int, group, max_fn: RowFn, sum_fn: RowFn, write_fn: Callable[..., None],
                        chunk_rows: int = _CHUNK_ROWS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row statistics of a vocab-parallel buffer in three steps per row chunk `rows` (a slice):
      1. maxes = max_fn(rows) -> [a, c], reduced with MAX over `group` (shifts for stable exponentials);
      2. sums = sum_fn(rows, maxes) -> [b, c], reduced with SUM over `group`;
      3. write_fn(rows, maxes, sums) writes the result (e.g. the gradient) in place.
    Without communication (group None or of size 1) each chunk runs all three while it is in cache (one pass);
    with it, all chunks run step 1, one all-reduce, step 2, one all-reduce, step 3 (two collectives per call).
    Returns (maxes [a, N], sums [b, N]), reduced.
    """
    chunks = [slice(s, min(n, s + chunk_rows)) for s in range(0, n, chunk_rows)]
    if tp_size(group) <= 1:
        maxes, sums = [], []
        for rows in chunks:
            m = max_fn(rows)
            z = sum_fn(rows, m)
            write_fn(rows, m, z)
            maxes.append(m)
            sums.append(z)
        return torch.cat(maxes, 1), torch.cat(sums, 1)
    maxes = torch.cat([max_fn(rows) for rows in chunks], 1)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    sums = torch.cat([sum_fn(rows, maxes[:, rows]) for rows in chunks], 1)
    dist.all_reduce(sums, group=group)
    for rows in chunks:
        write_fn(rows, maxes[:, rows], sums[:, rows])
    return maxes, sums


def local_labels(labels: torch.Tensor, width: int, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """(column of each label in this rank's slice (0 where outside), bool mask of labels outside the slice)."""
    start = tp_rank(group) * width
    outside = (labels < start) | (labels >= start + width)
    return (labels - start).masked_fill(outside, 0), outside


def subtract_onehot_(chunk: torch.Tensor, local: torch.Tensor, outside: torch.Tensor, weight=1.0) -> None:
    """chunk[i, local[i]] -= weight (or weight[i]) for the rows whose label lies in this rank's slice."""
    inside = ~outside
    rows = torch.arange(chunk.shape[0], device=chunk.device)[inside]
    w = weight[inside] if isinstance(weight, torch.Tensor) else weight
    chunk[rows, local[inside]] -= w


def vocab_parallel_softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """In place: logits [N, V/tp] (fp32 or fp64, this rank's columns) -> softmax - onehot, i.e. the gradient of
    the per-token cross entropy; returns that loss [N]. labels [N] are global vocabulary ids."""
    n, width = logits.shape
    local, outside = local_labels(labels, width, group)

    def max_fn(rows):
        return logits[rows].amax(dim=1).unsqueeze(0)

    def sum_fn(rows, m):  # [label logit (0 on other ranks), sum exp]
        chunk = logits[rows]
        label = chunk.gather(1, local[rows].unsqueeze(1)).squeeze(1).masked_fill(outside[rows], 0.0)
        chunk.sub_(m[0].unsqueeze(1)).exp_()
        return torch.stack([label, chunk.sum(dim=1)])

    def write_fn(rows, m, z):
        chunk = logits[rows]
        chunk.div_(z[1].unsqueeze(1))
        subtract_onehot_(chunk, local[rows], outside[rows])

    maxes, sums = chunked_row_passes_(n, group, max_fn, sum_fn, write_fn)
    return maxes[0] + sums[1].log() - sums[0]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group):
        grad = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32), copy=True)
        loss = vocab_parallel_softmax_grad_(grad, labels.reshape(-1), group)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.reshape(-1, 1)).view(ctx.shape).to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """Per-token CE (fp32; fp64 for fp64 logits) of vocab-parallel logits [..., V/tp] against global labels [...];
    equal to F.cross_entropy on the gathered logits."""
    return _VocabParallelCrossEntropy.apply(logits, labels, group)
