"""Cross entropy over vocab-parallel logits without gathering them (Megatron's _VocabParallelCrossEntropy).

Each rank holds logits [N, V/tp] for its vocabulary slice. Three all-reduces over the group give the row max, the
label's logit (only the owning rank contributes) and the softmax denominator; the gradient is local:
softmax - onehot on this rank's slice. `vocab_parallel_softmax_grad_` does this in place and is shared with the
fused LM-head loss (megatron/model/fused_lm_loss.py).
"""
import torch
import torch.distributed as dist

from megatron.tensor_parallel.mappings import tp_rank, tp_size

_CHUNK_ROWS = 16  # rows per pass over the [N, V/tp] buffer: cache resident while its passes run


def vocab_parallel_softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """In place: fp32 logits [N, V/tp] (this rank's columns) -> softmax - onehot, i.e. the gradient of the
    per-token cross entropy; returns that loss [N]. labels [N] are global vocabulary ids."""
    n, width = logits.shape
    start = tp_rank(group) * width
    outside = (labels < start) | (labels >= start + width)
    local = (labels - start).masked_fill(outside, 0)
    row_max = logits.amax(dim=1)
    if tp_size(group) > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    stats = torch.empty(2, n, dtype=torch.float32, device=logits.device)  # [label logit, sum exp]
    stats[0] = logits.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0)
    for s in range(0, n, _CHUNK_ROWS):
        chunk = logits[s:s + _CHUNK_ROWS]
        chunk.sub_(row_max[s:s + _CHUNK_ROWS].unsqueeze(1)).exp_()
        stats[1, s:s + _CHUNK_ROWS] = chunk.sum(dim=1)
    if tp_size(group) > 1:
        dist.all_reduce(stats, group=group)
    for s in range(0, n, _CHUNK_ROWS):
        logits[s:s + _CHUNK_ROWS].div_(stats[1, s:s + _CHUNK_ROWS].unsqueeze(1))
    rows = torch.arange(n, device=logits.device)[~outside]
    logits[rows, local[~outside]] -= 1.0
    return row_max + stats[1].log() - stats[0]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group):
        grad = logits.reshape(-1, logits.shape[-1]).to(torch.float32, copy=True)
        loss = vocab_parallel_softmax_grad_(grad, labels.reshape(-1), group)
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.reshape(-1, 1)).view(ctx.shape), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """Per-token CE (fp32) of vocab-parallel logits [..., V/tp] against global labels [...]; equal to
    F.cross_entropy on the gathered logits."""
    return _VocabParallelCrossEntropy.apply(logits, labels, group)
