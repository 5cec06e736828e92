"""Fused LM head losses: the [tokens, vocab] logits are turned into their gradient in place, chunk by chunk, for
the cross entropy and for cross entropy + knowledge distillation (MoS / KD).

The unfused path (linear -> log_softmax -> nll_loss) makes four or five passes over a [N, V] fp32 tensor
(412 MB for 2048 tokens x 50304 vocab): write logits, write log-probs, zero-fill the nll gradient, scatter,
log_softmax backward; the unfused KD loss adds a handful more (tempered copies of both models' logits, log-probs,
probabilities, their product) and keeps the student's logits alive for the backward. Here the forward writes the
logits once, then walks them in row chunks (megatron/tensor_parallel/cross_entropy.py: chunked_row_passes_; a
few cache-resident rows on the CPU, a few hundred MiB per chunk on a GPU, so the kernel count stays bounded),
computing each row's statistics and overwriting the logits with the
gradient of the loss. The backward is then two GEMMs; the upstream gradient is applied to the [N, h] operands,
never to the [N, V] buffer.

With tensor parallelism (a `tp_group` of size > 1) the weight is this rank's vocabulary slice [V/tp, h]: row maxima
and sums are all-reduced over the group (two collectives per call), and the in-place gradient covers this rank's
columns. The caller enters the tensor-parallel region first (copy_to_tensor_parallel_region), whose backward sums
the hidden gradient over the ranks.
"""
import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch

from megatron.tensor_parallel.cross_entropy import (chunked_row_passes_, label_logits, local_labels,
                                                    subtract_onehot_, vocab_parallel_softmax_grad_)
from megatron.tensor_parallel.mappings import tp_rank, tp_size


def _logits(hidden_NH, weight_VH, compute_dtype):
    """(h, w in the compute dtype, logits [N, V] in fp32, or fp64 for fp64 inputs)."""
    h = hidden_NH.to(compute_dtype)
    w = weight_VH.to(compute_dtype)
    logits = torch.mm(h, w.t())
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # loss math in fp32 (bf16/fp16 autocast)
    return h, w, logits


def _lm_head_backward(ctx, scale_N1: torch.Tensor):
    """Gradients of hidden and weight from the saved in-place logits gradient G: diag(g) G W and G^T diag(g) H."""
    h, w, grad_logits = ctx.saved_tensors
    gl = grad_logits if h.dtype == grad_logits.dtype else grad_logits.to(h.dtype)
    grad_h = torch.mm(gl, w) * scale_N1.to(gl.dtype)
    grad_w = torch.mm(gl.t(), h * scale_N1.to(h.dtype))
    return grad_h.to(ctx.input_dtypes[0]), grad_w.to(ctx.input_dtypes[1])


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor,
                compute_dtype: torch.dtype, tp_group=None):
        h, w, logits = _logits(hidden_NH, weight_VH, compute_dtype)
        ctx.save_for_backward(h, w, logits)
        ctx.input_dtypes = (hidden_NH.dtype, weight_VH.dtype)
        return vocab_parallel_softmax_grad_(logits, labels_N, tp_group)  # logits -> softmax - onehot, in place

    @staticmethod
    def backward(ctx, grad_loss_N: torch.Tensor):
        grad_h, grad_w = _lm_head_backward(ctx, grad_loss_N.unsqueeze(1))
        return grad_h, grad_w, None, None, None


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    t = hidden.device.type
    if torch.amp.is_autocast_available(t) and torch.is_autocast_enabled(t):
        return torch.get_autocast_dtype(t)
    return hidden.dtype


def _autocast_off(hidden: torch.Tensor):
    """Autocast disabled for hidden's device (the GEMMs here cast explicitly); nothing on devices without autocast
    (the `meta` device of the audits)."""
    t = hidden.device.type
    return torch.autocast(t, enabled=False) if torch.amp.is_autocast_available(t) else contextlib.nullcontext()


def fused_lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           tp_group=None) -> torch.Tensor:
    """Per-token CE of hidden [b, s, h] against the tied head weight [V, h]; labels [b, s] -> loss [b, s] fp32.

    Equal to F.cross_entropy(hidden @ weight.T, labels, reduction='none') (tests/unit/test_fused_lm_loss.py).
    Under autocast the GEMMs run in the autocast dtype and the softmax in fp32. With a tp_group of size > 1,
    `weight` is this rank's vocabulary slice and `hidden` must already be in the tensor-parallel region.
    """
    b, s, hdim = hidden.shape
    dtype = _compute_dtype(hidden)
    with _autocast_off(hidden):
        loss = _FusedLinearCrossEntropy.apply(hidden.reshape(b * s, hdim), weight, labels.reshape(b * s), dtype,
                                              tp_group)
    return loss.view(b, s)


# ------------------------------------------------------------------------------------------------ distillation
class DistillTarget(NamedTuple):
    """What the fused distillation loss needs besides the student's hidden states (moe/distill.py's kd_loss terms)."""
    teacher_logits: torch.Tensor  # [b, s, V/tp] the teacher's logits for this rank's vocabulary columns, no grad
    loss_mask: torch.Tensor  # [b, s] 1 for tokens that count
    temperature: float  # T of both softmaxes in the KL
    alpha: float  # weight of the LM loss
    beta: float  # weight of the KD term T^2 * mean KL
    vocab_size: Optional[int] = None  # true vocabulary: global columns >= this are padding, left out of the KL


def vocab_parallel_kd_grad_(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                            ce_weight: torch.Tensor, kd_weight: torch.Tensor, temperature: float,
                            vocab_size: Optional[int], group) -> Tuple[torch.Tensor, torch.Tensor]:
    """In place: the student's logits [N, V/tp] -> d total / d logits, where
    total = Σ_i ce_weight[i] · CE_i + Σ_i kd_weight[i] · KL_i, CE_i = the cross entropy of row i (all columns) and
    KL_i = KL(softmax(t_i/T) || softmax(s_i/T)) over the real vocabulary; returns (CE [N], KL [N]).

    Per row chunk (see chunked_row_passes_): maxima [s (all), s (real), t (real)]; sums [label logit, Σ e^(s-m),
    Σ e^((s-m')/T), Σ e^((t-m_t)/T), A = Σ e^((t-m_t)/T) · ((t-m_t) - (s-m'))/T]; then
    KL = A / Z_t - log Z_t + log Z_sT (from Σ_v p_t (log p_t - log p_sT), with Σ p_t = 1) and the gradient
    ce_w (p_s - onehot) + (kd_w / T) (p_sT - p_t). Padding columns are the tail of the global vocabulary, so on each
    rank the real ones are a prefix of its slice: the KL reads only that prefix.
    Args: teacher [N, V/tp] any float dtype (read, never written); ce_weight, kd_weight [N] in the logits' dtype.
    """
    n, width = logits.shape
    dtype = logits.dtype
    T = float(temperature)
    start = tp_rank(group) * width
    real = width if vocab_size is None else max(0, min(width, vocab_size - start))
    padded_anywhere = vocab_size is not None and vocab_size < width * tp_size(group)
    share = T == 1.0 and not padded_anywhere  # then p_sT = p_s: one softmax of the student serves both terms
    local, outside = local_labels(labels, width, group)
    label = label_logits(logits, local, outside)  # read before the buffer is overwritten; 0 off this rank's slice
    neg_inf = torch.full((1, n), -math.inf, dtype=dtype, device=logits.device)

    def max_fn(rows):
        s = logits[rows]
        m_s = s.amax(dim=1)
        if real == 0:
            return torch.cat([m_s.unsqueeze(0), neg_inf[:, rows], neg_inf[:, rows]])
        m_real = m_s if real == width else s[:, :real].amax(dim=1)
        return torch.stack([m_s, m_real, teacher[rows, :real].to(dtype).amax(dim=1)])

    def sum_fn(rows, m):
        s = logits[rows]
        z_s = torch.exp(s - m[0].unsqueeze(1)).sum(dim=1)
        if real == 0:
            zero = torch.zeros_like(z_s)
            return torch.stack([label[rows], z_s, zero, zero, zero])
        s_shift = s[:, :real] - m[1].unsqueeze(1)  # s - m', m' the max over real columns
        z_st = z_s if share else torch.exp(s_shift / T).sum(dim=1)
        t_shift = (teacher[rows, :real].to(dtype) - m[2].unsqueeze(1)) / T
        e_t = torch.exp(t_shift)
        a = (e_t * (t_shift - s_shift / T)).sum(dim=1)
        return torch.stack([label[rows], z_s, z_st, e_t.sum(dim=1), a])

    def write_fn(rows, m, z):
        chunk = logits[rows]
        ce_w, kd_w = ce_weight[rows].unsqueeze(1), (kd_weight[rows] / T).unsqueeze(1)
        p_t = None
        if real > 0:
            p_t = torch.exp((teacher[rows, :real].to(dtype) - m[2].unsqueeze(1)) / T) / z[3].unsqueeze(1)
            p_st = None if share else torch.exp((chunk[:, :real] - m[1].unsqueeze(1)) / T) / z[2].unsqueeze(1)
        chunk.sub_(m[0].unsqueeze(1)).exp_().div_(z[1].unsqueeze(1))  # p_s
        if share:
            chunk.mul_(ce_w + kd_w)  # ce_w p_s + kd_w p_sT with p_sT = p_s
        else:
            chunk.mul_(ce_w)
            if p_t is not None:
                chunk[:, :real].add_(kd_w * p_st)
        if p_t is not None:
            chunk[:, :real].sub_(kd_w * p_t)

    maxes, sums = chunked_row_passes_(logits, group, max_fn, sum_fn, write_fn)
    subtract_onehot_(logits, local, outside, ce_weight)
    ce = maxes[0] + sums[1].log() - sums[0]
    kl = sums[4] / sums[3] - sums[3].log() + sums[2].log()
    return ce, kl


class _FusedLinearCrossEntropyKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, labels_N, teacher_NV, ce_weight_N, kd_weight_N, temperature, vocab_size,
                compute_dtype, tp_group):
        h, w, logits = _logits(hidden_NH, weight_VH, compute_dtype)
        ce_w, kd_w = ce_weight_N.to(logits.dtype), kd_weight_N.to(logits.dtype)
        ce, kl = vocab_parallel_kd_grad_(logits, labels_N, teacher_NV, ce_w, kd_w, temperature, vocab_size,
                                         tp_group)
        ctx.save_for_backward(h, w, logits)
        ctx.input_dtypes = (hidden_NH.dtype, weight_VH.dtype)
        total = (ce_w * ce).sum() + (kd_w * kl).sum()
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        grad_h, grad_w = _lm_head_backward(ctx, grad_total.reshape(1, 1))
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def fused_lm_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, target: DistillTarget,
                     tp_group=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's LM + distillation loss from its final hidden states, without materialising anything [N, V]
    beyond the logits buffer that becomes their gradient.

    total = alpha · lm + beta · T² · mean_{mask} KL(softmax(teacher/T) || softmax(student/T)), lm = mean_{mask} CE,
    the same as moe.distill.kd_loss on the student's logits (tests/unit/test_fused_kd_loss.py).
    Args:
      hidden [b, s, h] (in the tensor-parallel region under TP), weight [V/tp, h] the tied head (slice), labels
      [b, s] global ids, target: DistillTarget (teacher logits of the same vocabulary columns, mask, T, alpha,
      beta, true vocabulary size).
    Returns:
      (total: scalar, differentiable w.r.t. hidden and weight; ce [b, s] and kl [b, s] per token, no gradient).
    Communication: two all-reduces over tp_group (when its size is > 1).
    """
    b, s, hdim = hidden.shape
    dtype = _compute_dtype(hidden)
    mask = target.loss_mask.reshape(b * s).to(torch.promote_types(dtype, torch.float32))
    count = mask.sum().clamp(min=1.0)
    T = float(target.temperature)
    ce_weight = target.alpha * mask / count
    kd_weight = target.beta * T * T * mask / count
    with _autocast_off(hidden):
        total, ce, kl = _FusedLinearCrossEntropyKD.apply(
            hidden.reshape(b * s, hdim), weight, labels.reshape(b * s), target.teacher_logits.reshape(b * s, -1),
            ce_weight, kd_weight, T, target.vocab_size, dtype, tp_group)
    return total, ce.view(b, s), kl.view(b, s)
