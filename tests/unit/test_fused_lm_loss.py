"""Fused LM head + cross entropy equals the unfused float64 reference (loss and both gradients)."""
import pytest
import torch
import torch.nn.functional as F

from megatron.model.fused_lm_loss import fused_lm_cross_entropy


@pytest.mark.parametrize("n_rows", [1, 31, 32, 77])  # below, at and across the chunk size
def test_matches_float64_reference(n_rows):
    torch.manual_seed(0)
    h = torch.randn(1, n_rows, 16, requires_grad=True)
    w = torch.randn(200, 16, requires_grad=True)
    labels = torch.randint(0, 200, (1, n_rows))
    upstream = torch.rand(1, n_rows)  # a non-uniform per-token gradient (e.g. a loss mask / N)
    loss = fused_lm_cross_entropy(h, w, labels)
    (loss * upstream).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).view(n_rows, 200), labels.view(n_rows), reduction="none").view(1, n_rows)
    (ref * upstream.double()).sum().backward()
    # fp32 vs fp64: logits of magnitude ~16 and a 200-way softmax keep errors around 1e-6 relative
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    h = torch.randn(2, 8, 32)
    w = torch.randn(100, 32) * 0.1
    labels = torch.randint(0, 100, (2, 8))
    ref = fused_lm_cross_entropy(h, w, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_lm_cross_entropy(h, w, labels)
    assert got.dtype == torch.float32
    # bf16 GEMM inputs carry ~3 significant digits; the softmax itself runs in fp32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
