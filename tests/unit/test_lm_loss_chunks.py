"""The LM-head losses' chunk policy: both policies (CPU: a few cache-resident rows; GPU: chunks sized by bytes) equal
an unchunked float64 reference, and on a non-CPU device the fused losses dispatch a bounded number of aten ops with no
host sync (counted on the `meta` device, where the GPU policy applies and any `.item()` or mask index would fail)."""
import pytest
import torch
import torch.nn.functional as F

from megatron.audit import DispatchAudit
from megatron.model.fused_lm_loss import DistillTarget, fused_lm_cross_entropy, fused_lm_kd_loss
from megatron.tensor_parallel import cross_entropy as ce
from moe.distill import DistillConfig, kd_loss


def _policy(monkeypatch, name, chunk_bytes=None):
    """Forces a policy on CPU tensors: 'cpu' (CPU_CHUNK_ROWS) or 'gpu' (bytes-sized, GPU_CHUNK_BYTES)."""
    original = ce.rows_per_chunk
    monkeypatch.setattr(ce, "rows_per_chunk", lambda buf, device_type=None: original(buf, name))
    if chunk_bytes is not None:
        monkeypatch.setattr(ce, "GPU_CHUNK_BYTES", chunk_bytes)


def test_policy_is_chosen_by_device():
    cpu = torch.empty(4096, 50304)
    meta = torch.empty(4096, 50304, device="meta")
    assert ce.rows_per_chunk(cpu) == ce.CPU_CHUNK_ROWS
    assert ce.rows_per_chunk(meta) == ce.GPU_CHUNK_BYTES // (50304 * 4)  # 1334 rows: 4 chunks of <= 256 MiB
    assert ce.rows_per_chunk(torch.empty(8, 100, device="meta")) == 8  # fits: the whole buffer in one pass
    assert ce.rows_per_chunk(torch.empty(3, ce.GPU_CHUNK_BYTES, device="meta")) == 1  # a huge row: one per pass


# policy, GPU_CHUNK_BYTES: the CPU rows; the GPU rule with 3 rows per chunk (200 fp32 columns) and the whole buffer
POLICIES = [("cpu", None), ("gpu", 3 * 200 * 4), ("gpu", None)]


@pytest.mark.parametrize("policy,chunk_bytes", POLICIES)
def test_cross_entropy_both_policies_equal_float64_reference(monkeypatch, policy, chunk_bytes):
    _policy(monkeypatch, policy, chunk_bytes)
    torch.manual_seed(0)
    n = 37  # several chunks under either policy, and a partial last chunk
    h = torch.randn(1, n, 16, requires_grad=True)
    w = torch.randn(200, 16, requires_grad=True)
    labels = torch.randint(0, 200, (1, n))
    upstream = torch.rand(1, n)
    loss = fused_lm_cross_entropy(h, w, labels)
    (loss * upstream).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).view(n, 200), labels.view(n), reduction="none").view(1, n)
    (ref * upstream.double()).sum().backward()
    # fp32 vs fp64: logits of magnitude ~16 over a 200-way softmax keep errors near 1e-6 relative
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy,chunk_bytes", [("cpu", None), ("gpu", 3 * 40 * 8), ("gpu", None)])
@pytest.mark.parametrize("T,vocab_size", [(1.0, None), (2.0, 33)])
def test_kd_loss_both_policies_equal_float64_reference(monkeypatch, policy, chunk_bytes, T, vocab_size):
    _policy(monkeypatch, policy, chunk_bytes)
    g = torch.Generator().manual_seed(1)
    b, s, hd, v = 2, 19, 8, 40
    hidden = torch.randn(b, s, hd, generator=g, dtype=torch.float64)
    weight = torch.randn(v, hd, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 33, (b, s), generator=g)
    teacher = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(b, s, generator=g) > 0.3).double()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, _, _ = fused_lm_kd_loss(h, w, labels, DistillTarget(teacher, mask, T, 0.7, 0.4, vocab_size))
    total.backward()
    # unchunked reference: full logits, F.cross_entropy and moe.distill.kd_loss
    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = rh @ rw.t()
    lm = (F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none").view(b, s) * mask).sum()
    lm = lm / mask.sum()
    cfg = DistillConfig(kd=True, load_teacher="unused", kd_temp=T, kd_alpha_ce=0.7, kd_beta_ce=0.4)
    ref, _ = kd_loss(lm, logits, teacher, mask, cfg, None, vocab_size)
    ref.backward()
    # both in float64: only summation order differs
    torch.testing.assert_close(total, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, rh.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, rw.grad, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------- op-count audit (the GPU policy, on meta)
B, S, V, H = 4, 1024, 50304, 64  # micro-batch 4 x seq 1024 x GPT-2's padded vocabulary (hidden size is irrelevant)


def test_cross_entropy_op_count_and_syncs_on_a_gpu_policy():
    h = torch.empty(B, S, H, device="meta", requires_grad=True)
    w = torch.empty(V, H, device="meta", requires_grad=True)
    labels = torch.empty(B, S, dtype=torch.long, device="meta")
    with DispatchAudit() as audit:
        fused_lm_cross_entropy(h, w, labels).sum().backward()
    assert audit.syncs == [], audit.report()
    assert audit.total_ops <= 200, audit.report()  # 7,456 with 16-row chunks and mask indexing (issue 23)


def test_kd_loss_op_count_and_syncs_on_a_gpu_policy():
    h = torch.empty(B, S, H, device="meta", requires_grad=True)
    w = torch.empty(V, H, device="meta", requires_grad=True)
    labels = torch.empty(B, S, dtype=torch.long, device="meta")
    teacher = torch.empty(B, S, V, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(B, S, device="meta")
    target = DistillTarget(teacher, mask, 2.0, 0.5, 0.5, 50257)
    with DispatchAudit() as audit:
        total, _, _ = fused_lm_kd_loss(h, w, labels, target)
        total.backward()
    assert audit.syncs == [], audit.report()
    assert audit.total_ops <= 400, audit.report()  # ~5 passes per chunk over student and teacher columns


def test_cpu_policy_has_no_host_syncs_either():
    torch.manual_seed(0)
    h = torch.randn(2, 40, 8, requires_grad=True)
    w = torch.randn(100, 8, requires_grad=True)
    labels = torch.randint(0, 100, (2, 40))
    with DispatchAudit() as audit:
        fused_lm_cross_entropy(h, w, labels).sum().backward()
    assert audit.syncs == [], audit.report()
