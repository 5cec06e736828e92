"""Softmax statistics over vocab-parallel logits without gathering them (Megatron's _VocabParallelCrossEntropy).

Each rank holds logits [N, V/tp] for its vocabulary slice. A softmax over the whole vocabulary needs two
collectives per row: the max (all-reduce MAX) and the sums (all-reduce SUM); everything else is local.
`chunked_row_passes_` is that skeleton, run in row chunks, and is the one place the fused losses share:
`vocab_parallel_softmax_grad_` (cross entropy, here) and the fused distillation loss
(megatron/model/fused_lm_loss.py) each only say what to reduce per chunk and what to write back.

Chunk size is a per-device policy (`rows_per_chunk`): on the CPU a chunk is a few rows that stay in cache while
its passes run (the passes are memory bound there); on a GPU (any non-CPU device) a chunk is sized by bytes
(`GPU_CHUNK_BYTES`), so the kernel count is bounded by the buffer's size in bytes, not its rows: ~10 launches per
chunk, 4 chunks for 4 x 1024 tokens x 50304 columns fp32. Nothing here indexes by a boolean mask or loops over
rows (no host sync on CUDA): labels are gathered and the one-hot subtracted with one fixed-size op per call.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.tensor_parallel.mappings import tp_rank, tp_size

CPU_CHUNK_ROWS = 16  # CPU: rows per pass over the [N, V/tp] buffer: cache resident while its passes run
GPU_CHUNK_BYTES = 256 << 20  # other devices: bytes of the buffer per pass (large: launches, not cache, matter)

RowFn = Callable[..., torch.Tensor]


def rows_per_chunk(buf: torch.Tensor, device_type: Optional[str] = None) -> int:
    """Rows of `buf` [N, W] per pass: CPU_CHUNK_ROWS on the CPU, else as many rows as fit in GPU_CHUNK_BYTES (at
    least one; all N when the whole buffer fits). device_type (default: buf's) picks the policy."""
    n = buf.shape[0]
    if (device_type or buf.device.type) == "cpu":
        return CPU_CHUNK_ROWS
    row_bytes = max(1, buf.shape[1] * buf.element_size())
    return max(1, min(n, GPU_CHUNK_BYTES // row_bytes))


def chunked_row_passes_(buf: torch.Tensor, group, max_fn: RowFn, sum_fn: RowFn,
                        write_fn: Callable[..., None]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row statistics of a vocab-parallel buffer `buf` [N, V/tp] in three steps per row chunk `rows` (a slice):
      1. maxes = max_fn(rows) -> [a, c], reduced with MAX over `group` (shifts for stable exponentials);
      2. sums = sum_fn(rows, maxes) -> [b, c], reduced with SUM over `group`;
      3. write_fn(rows, maxes, sums) writes the result (e.g. the gradient) in place.
    Without communication (group None or of size 1) each chunk runs all three while it is in cache (one pass);
    with it, all chunks run step 1, one all-reduce, step 2, one all-reduce, step 3 (two collectives per call).
    Chunks: rows_per_chunk(buf). Returns (maxes [a, N], sums [b, N]), reduced.
    """
    n, step = buf.shape[0], rows_per_chunk(buf)
    chunks = [slice(s, min(n, s + step)) for s in range(0, n, step)]
    if tp_size(group) <= 1:
        maxes, sums = [], []
        for rows in chunks:
            m = max_fn(rows)
            z = sum_fn(rows, m)
            write_fn(rows, m, z)
            maxes.append(m)
            sums.append(z)
        if len(chunks) == 1:
            return maxes[0], sums[0]
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


def label_logits(logits: torch.Tensor, local: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """logits[i, local[i]] for the rows whose label lies in this rank's slice, 0 elsewhere: [N] (one gather; read
    before the buffer is overwritten)."""
    return logits.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0)


def subtract_onehot_(buf: torch.Tensor, local: torch.Tensor, outside: torch.Tensor, weight=1.0) -> None:
    """buf[i, local[i]] -= weight (or weight[i]) for the rows whose label lies in this rank's slice; one
    scatter_add_ over all rows (rows outside add -0.0 to column 0, which changes nothing), no boolean indexing."""
    if isinstance(weight, torch.Tensor):
        neg = -weight.to(buf.dtype).masked_fill(outside, 0.0)
    else:
        neg = torch.full(outside.shape, -float(weight), dtype=buf.dtype, device=buf.device).masked_fill_(outside, 0.0)
    buf.scatter_add_(1, local.unsqueeze(1), neg.unsqueeze(1))


def vocab_parallel_softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """In place: logits [N, V/tp] (fp32 or fp64, this rank's columns) -> softmax - onehot, i.e. the gradient of
    the per-token cross entropy; returns that loss [N]. labels [N] are global vocabulary ids."""
    local, outside = local_labels(labels, logits.shape[1], group)
    label = label_logits(logits, local, outside)  # 0 on the ranks that do not hold the label: summed over TP

    def max_fn(rows):
        return logits[rows].amax(dim=1).unsqueeze(0)

    def sum_fn(rows, m):  # [label logit, sum exp]
        return torch.stack([label[rows], logits[rows].sub_(m[0].unsqueeze(1)).exp_().sum(dim=1)])

    def write_fn(rows, m, z):
        logits[rows].div_(z[1].unsqueeze(1))

    maxes, sums = chunked_row_passes_(logits, group, max_fn, sum_fn, write_fn)
    subtract_onehot_(logits, local, outside)
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
