"""The fused LM-head + distillation loss equals the unfused reference (moe.distill.kd_loss on the student's logits
plus F.cross_entropy) in float64: the value and the gradients of the student's hidden states and head weight."""
import pytest
import torch
import torch.nn.functional as F

from megatron.model.fused_lm_loss import DistillTarget, fused_lm_kd_loss
from moe.distill import DistillConfig, TeacherRunner, kd_loss

B, H, V = 2, 8, 40


def _case(seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, seq, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 33, (B, seq), generator=g)
    teacher = torch.randn(B, seq, V, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(B, seq, generator=g) > 0.3).double()
    return hidden, weight, labels, teacher, mask


def reference(hidden, weight, labels, teacher, mask, T, alpha, beta, vocab_size):
    """The unfused path training used before: full logits, F.cross_entropy, moe.distill.kd_loss."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.t()
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(labels.shape)
    lm = (ce * mask).sum() / mask.sum()
    cfg = DistillConfig(kd=True, load_teacher="unused", kd_temp=T, kd_alpha_ce=alpha, kd_beta_ce=beta)
    total, kd_term = kd_loss(lm, logits, teacher, mask, cfg, None, vocab_size)
    total.backward()
    return total.detach(), lm.detach(), kd_term.detach(), h.grad, w.grad


@pytest.mark.parametrize("seq", [5, 16, 23])  # below, at and across the 16-row chunk (B x seq rows)
@pytest.mark.parametrize("T,vocab_size", [(1.0, None), (1.0, 33), (2.0, None), (0.5, 33)])
def test_fused_kd_equals_unfused_reference_fp64(seq, T, vocab_size):
    hidden, weight, labels, teacher, mask = _case(seq)
    alpha, beta = 0.7, 1.3
    want_total, want_lm, want_kd, want_gh, want_gw = reference(hidden, weight, labels, teacher, mask, T, alpha, beta,
                                                               vocab_size)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, ce, kl = fused_lm_kd_loss(h, w, labels, DistillTarget(teacher, mask, T, alpha, beta, vocab_size))
    total.backward()
    # fp64 both sides; they differ only in summation order and the KL's algebraic form (~1e-15 relative)
    torch.testing.assert_close(total, want_total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((ce * mask).sum() / mask.sum(), want_lm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T * T * (kl * mask).sum() / mask.sum(), want_kd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, want_gh, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(w.grad, want_gw, rtol=1e-11, atol=1e-13)
    assert not ce.requires_grad and not kl.requires_grad


def test_huge_padding_logits_do_not_leak_into_the_kl():
    """Padding columns (>= vocab_size) with logits far above the real ones: excluded from the KL, as in kd_loss."""
    hidden, weight, labels, teacher, mask = _case(7, seed=3)
    weight[33:] *= 30  # padding rows of the head give logits ~100x the real ones
    teacher[..., 33:] = 80.0
    want = reference(hidden, weight, labels, teacher, mask, 2.0, 1.0, 1.0, 33)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, _, _ = fused_lm_kd_loss(h, w, labels, DistillTarget(teacher, mask, 2.0, 1.0, 1.0, 33))
    total.backward()
    torch.testing.assert_close(total, want[0], rtol=1e-10, atol=1e-10)  # fp64; large shifts cost a few digits
    torch.testing.assert_close(w.grad, want[4], rtol=1e-9, atol=1e-10)


def test_fp32_and_bf16_inputs_stay_close_to_fp64():
    hidden, weight, labels, teacher, mask = _case(9, seed=1)
    want = reference(hidden, weight, labels, teacher, mask, 2.0, 1.0, 0.5, 33)[0]
    got = fused_lm_kd_loss(hidden.float(), weight.float(), labels,
                           DistillTarget(teacher.bfloat16(), mask.float(), 2.0, 1.0, 0.5, 33))[0]
    assert got.dtype == torch.float32
    # the teacher's logits rounded to bf16 (8 bits of mantissa, ~0.4% of |t| <= ~10) move the KL by ~1e-2
    assert abs(got.item() - want.item()) < 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = fused_lm_kd_loss(hidden.float(), weight.float(), labels,
                                DistillTarget(teacher.float(), mask.float(), 2.0, 1.0, 0.5, 33))[0]
    assert half.dtype == torch.float32 and abs(half.item() - want.item()) < 0.1  # bf16 GEMM, fp32 softmax


def test_teacher_runs_in_inference_mode_and_the_compute_dtype():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(V, H), torch.nn.Linear(H, V))
    tokens = torch.randint(0, V, (2, 5))
    cfg = DistillConfig(kd=True, load_teacher="unused")
    fp32 = TeacherRunner(model, cfg).forward(tokens)
    assert fp32.is_inference() and fp32.dtype == torch.float32
    bf16 = TeacherRunner(model, cfg, torch.bfloat16).forward(tokens)
    assert bf16.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, rtol=2e-2, atol=2e-2)  # bf16 weights: ~3 significant digits
