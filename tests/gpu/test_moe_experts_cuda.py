"""CUDA checks of the expert compute: the grouped-GEMM bf16 path (torch._grouped_mm) and the expert forward/backward
against a float64 per-expert loop, plus the MoE layer's host-sync budget under torch.cuda.set_sync_debug_mode.
Skipped (with the reason) without CUDA."""
import pytest
import torch

from moe import experts as ex
from moe.config import MoEConfig
from moe.layer import MoELayer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")]

E_, D, F_ = 4, 128, 256
COUNTS = (37, 0, 91, 16)  # an empty expert and rows that are not multiples of the kernel's tiles


def _weights(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(E_, F_, D, generator=g) / D ** 0.5, torch.randn(E_, F_, generator=g) * 0.1,
         torch.randn(E_, D, F_, generator=g) / F_ ** 0.5, torch.randn(E_, D, generator=g) * 0.1]
    return [t.to("cuda", dtype) for t in w]


def _loop_reference(x, w, dy):
    """float64 per-expert loop: y_i = gelu_tanh(x_i W1_i^T + b1_i) W2_i^T + b2_i and its gradients."""
    x = x.double().detach().requires_grad_(True)
    w = [t.double().detach().requires_grad_(True) for t in w]
    ys, start = [], 0
    for i, n in enumerate(COUNTS):
        h = x[start:start + n] @ w[0][i].t() + w[1][i]
        ys.append(torch.nn.functional.gelu(h, approximate="tanh") @ w[2][i].t() + w[3][i])
        start += n
    y = torch.cat(ys)
    (y * dy.double()).sum().backward()
    return [y.detach(), x.grad] + [t.grad for t in w]


def test_grouped_mm_bf16_path_runs_under_autocast_and_matches_fp64_loop():
    """fp32 input and fp32 master weights under bf16 autocast: the grouped kernel runs in bf16 ('auto' picks it on
    CUDA in bf16 only), outputs and gradients match the fp64 loop within bf16 round-off, gradients are fp32."""
    w = [t.requires_grad_(True) for t in _weights()]
    x = torch.randn(sum(COUNTS), D, device="cuda", requires_grad=True)
    dy = torch.randn(sum(COUNTS), D, device="cuda")
    counts_e = torch.tensor(COUNTS, device="cuda")
    sm90 = torch.cuda.get_device_capability() >= (9, 0)  # 'auto' uses the grouped kernel on sm90+ only
    assert ex.grouped_mm_ok(x.bfloat16(), w[0].bfloat16(), "auto") == sm90 and not ex.grouped_mm_ok(x, w[0], "auto")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ex.grouped_mlp(x, COUNTS, *w, counts_e=counts_e, grouped_mm="auto")
    assert y.dtype == torch.bfloat16
    (y.float() * dy).sum().backward()
    got = [y.float(), x.grad] + [t.grad for t in w]
    assert x.grad.dtype == torch.float32 and all(t.grad.dtype == torch.float32 for t in w)
    want = _loop_reference(x, w, dy)
    for g, r, name in zip(got, want, ["y", "dx", "dw1", "db1", "dw2", "db2"]):
        # bf16 operands (8-bit significand): ~2^-8 relative per product, fp32 accumulation; sums of up to 91 rows
        scale = r.abs().max().item()
        assert (g.double() - r).abs().max().item() <= 3e-2 * scale + 1e-3, name


@pytest.mark.parametrize("grouped_mm", ["off", "on"])
def test_expert_forward_backward_fp32_matches_fp64_loop(grouped_mm):
    """Without autocast (fp32 everywhere; 'on' forces the grouped kernel's fp32 fallback): equal to the fp64 loop
    within TF32/fp32 round-off (TF32 may be on for matmuls: 10-bit significand, so 1e-2 relative)."""
    w = [t.requires_grad_(True) for t in _weights()]
    x = torch.randn(sum(COUNTS), D, device="cuda", requires_grad=True)
    dy = torch.randn(sum(COUNTS), D, device="cuda")
    y = ex.grouped_mlp(x, COUNTS, *w, grouped_mm=grouped_mm)
    (y * dy).sum().backward()
    got = [y, x.grad] + [t.grad for t in w]
    for g, r in zip(got, _loop_reference(x, w, dy)):
        assert (g.double() - r).abs().max().item() <= 1e-2 * r.abs().max().item() + 1e-4


def test_inference_path_accepts_fp32_input_with_bf16_weights():
    """Finding 1: a bf16 MoE teacher fed LayerNorm's fp32 output under autocast runs (it raised a dtype error)."""
    w = _weights(torch.bfloat16)
    x = torch.randn(sum(COUNTS), D, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = ex.grouped_mlp_inference(x, COUNTS, *w)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_moe_layer_host_syncs_on_cuda(drop_tokens):
    """Capacity mode (padded by default on CUDA): no host sync in forward + backward; dropless: the one counts copy.
    torch.cuda.set_sync_debug_mode('error') raises at any synchronising call, so the capacity step must run clean;
    the dropless step is run with 'warn' and the warnings counted."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E_, topk=2, drop_tokens=drop_tokens)
    layer = MoELayer(D, F_, E_, cfg).cuda()
    x = torch.randn(256, D, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, stats = layer(x)
        (y.float().square().mean() + stats.aux_loss).backward()

    step()  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= (0 if drop_tokens else 1), [str(w.message) for w in syncs]
