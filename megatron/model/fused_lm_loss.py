"""Fused LM head + cross entropy: the [tokens, vocab] logits are turned into their gradient in place, chunk by chunk.

The unfused path (linear -> log_softmax -> nll_loss) makes four or five passes over a [N, V] fp32 tensor
(412 MB for 2048 tokens x 50304 vocab): write logits, write log-probs, zero-fill the nll gradient, scatter,
log_softmax backward. Here the forward writes the logits once, then walks them in row chunks small enough to
stay in cache, computing each row's logsumexp and overwriting the logits with softmax - onehot, i.e. the
gradient of the per-token loss. The backward is then two GEMMs; the per-token upstream gradient is applied to
the [N, h] operands, never to the [N, V] buffer.

With tensor parallelism (a `tp_group` of size > 1) the weight is this rank's vocabulary slice [V/tp, h]: the row
max, the label's logit and the softmax denominator are all-reduced over the group (three collectives per call,
as Megatron's vocab-parallel cross entropy), and the in-place gradient covers this rank's columns. The caller
enters the tensor-parallel region first (copy_to_tensor_parallel_region), whose backward sums the hidden
gradient over the ranks.
"""
import torch
import torch.distributed as dist

from megatron.tensor_parallel.cross_entropy import vocab_parallel_softmax_grad_

_CHUNK_ROWS = 16  # 16 x 50304 x 4 B = 3.2 MB per chunk: cache resident while its passes run


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor,
                compute_dtype: torch.dtype, tp_group=None):
        h = hidden_NH.to(compute_dtype)
        w = weight_VH.to(compute_dtype)
        logits = torch.mm(h, w.t())  # [N, V] in the compute dtype
        if logits.dtype != torch.float32:
            logits = logits.float()  # loss math in fp32 (bf16/fp16 autocast)
        ctx.save_for_backward(h, w, logits)
        ctx.input_dtypes = (hidden_NH.dtype, weight_VH.dtype)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            return vocab_parallel_softmax_grad_(logits, labels_N, tp_group)
        n = logits.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        rows = torch.arange(n, device=logits.device)
        for start in range(0, n, _CHUNK_ROWS):
            chunk = logits[start:start + _CHUNK_ROWS]
            lab = labels_N[start:start + _CHUNK_ROWS]
            target = chunk.gather(1, lab.unsqueeze(1))  # [c, 1] label logits, read before overwriting
            row_max = chunk.amax(dim=1, keepdim=True)
            chunk.sub_(row_max).exp_()
            denom = chunk.sum(dim=1, keepdim=True)
            chunk.div_(denom)  # softmax, in place
            loss[start:start + _CHUNK_ROWS] = (row_max + denom.log() - target).squeeze(1)
        logits[rows, labels_N] -= 1.0  # softmax - onehot = d loss_i / d logits_i
        return loss

    @staticmethod
    def backward(ctx, grad_loss_N: torch.Tensor):
        h, w, grad_logits = ctx.saved_tensors
        g = grad_loss_N.to(torch.float32).unsqueeze(1)  # [N, 1]
        gl = grad_logits if h.dtype == torch.float32 else grad_logits.to(h.dtype)
        grad_h = torch.mm(gl, w) * g.to(gl.dtype)  # diag(g) (G W)
        grad_w = torch.mm(gl.t(), h * g.to(h.dtype))  # G^T diag(g) H
        return grad_h.to(ctx.input_dtypes[0]), grad_w.to(ctx.input_dtypes[1]), None, None, None


def fused_lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           tp_group=None) -> torch.Tensor:
    """Per-token CE of hidden [b, s, h] against the tied head weight [V, h]; labels [b, s] -> loss [b, s] fp32.

    Equal to F.cross_entropy(hidden @ weight.T, labels, reduction='none') (tests/unit/test_fused_lm_loss.py).
    Under autocast the GEMMs run in the autocast dtype and the softmax in fp32. With a tp_group of size > 1,
    `weight` is this rank's vocabulary slice and `hidden` must already be in the tensor-parallel region.
    """
    b, s, hdim = hidden.shape
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _FusedLinearCrossEntropy.apply(hidden.reshape(b * s, hdim), weight, labels.reshape(b * s), dtype,
                                              tp_group)
    return loss.view(b, s)
