"""Cross entropy over vocab-parallel logits without gathering them (Megatron's _VocabParallelCrossEntropy).

Each rank holds logits [N, V/tp] for its vocabulary slice. Three all-reduces over the group give the row max, the
label's logit (only the owning rank contributes) and the softmax denominator; the backward is local:
softmax - onehot on this rank's slice.
"""
import torch
import torch.distributed as dist

from megatron.tensor_parallel.mappings import tp_rank, tp_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group):
        logits = logits.float()
        per_rank = logits.shape[-1]
        start = tp_rank(group) * per_rank
        row_max = logits.amax(dim=-1)
        if tp_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        outside = (labels < start) | (labels >= start + per_rank)
        local = (labels - start).masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()
        denom = exp.sum(dim=-1)
        if tp_size(group) > 1:
            both = torch.stack((target, denom))
            dist.all_reduce(both, group=group)
            target, denom = both[0], both[1]
        loss = denom.log() - target
        exp.div_(denom.unsqueeze(-1))  # softmax of this rank's slice
        ctx.save_for_backward(exp, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """Per-token CE (fp32) of vocab-parallel logits [..., V/tp] against global labels [...]; equal to
    F.cross_entropy on the gathered logits."""
    return _VocabParallelCrossEntropy.apply(logits, labels, group)
