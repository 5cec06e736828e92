"""CPU audits of what the MoE layer does on a GPU (issue 23): GEMM dtypes under --bf16 with CUDA's fp32 LayerNorm
output, host syncs per layer and per training step (budgets: none in capacity mode with padding, one per MoE layer
per micro-batch dropless), a meta-device forward+backward, and an MoE teacher in bf16 under autocast.

megatron/audit.py records the aten op stream (the same on CPU and CUDA); `cuda_autocast_rules` gives CPU autocast
CUDA's rule that LayerNorm returns fp32, so every MoE layer sees the fp32 input it sees under CUDA autocast.
"""
import pytest
import torch
from torch import nn

from megatron.audit import DispatchAudit, cuda_autocast_rules
from moe import dispatch
from moe.config import MoEConfig
from moe.layer import MoELayer

D, F_, E = 32, 64, 4


def _layer(drop_tokens=True, pad=None, **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, topk=2, drop_tokens=drop_tokens, train_capacity_factor=1.0, **kw)
    return MoELayer(D, F_, E, cfg, pad_to_capacity=pad)


def _step(layer, x, ln):
    y, stats = layer(ln(x))
    (y.float().square().mean() + 0.01 * stats.aux_loss).backward()


def _moe_gemms(audit):
    expert = [g for g in audit.gemms if g.site.startswith(("moe/experts.py", "moe/ops/"))]
    router = [g for g in audit.gemms if g.site.startswith("moe/gating.py")]
    return expert, router


@pytest.mark.parametrize("drop_tokens", [True, False], ids=["capacity", "dropless"])
@pytest.mark.parametrize("grouped_mm", ["off", "on"])
def test_expert_gemms_run_in_bf16_with_fp32_input_under_autocast(drop_tokens, grouped_mm):
    """Every expert GEMM (forward and backward, loop and grouped kernels) runs in bf16 although LayerNorm hands the
    layer fp32 and the master weights are fp32; gradients come back in fp32 (each parameter's dtype)."""
    if grouped_mm == "on" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    layer, ln = _layer(drop_tokens), nn.LayerNorm(D)
    layer.experts.grouped_mm = grouped_mm
    x = torch.randn(64, D)
    with cuda_autocast_rules(torch.bfloat16), DispatchAudit() as audit:
        assert ln(x).dtype == torch.float32  # CUDA's rule, reproduced
        _step(layer, x, ln)
    expert, _ = _moe_gemms(audit)
    assert len(expert) >= 6 and {g.dtypes[0] for g in expert} == {torch.bfloat16}, audit.gemm_dtypes()
    if grouped_mm == "on":
        assert {g.op for g in expert} == {"_grouped_mm"}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_router_gemm_is_fp32_under_autocast():
    layer, ln = _layer(), nn.LayerNorm(D)
    with cuda_autocast_rules(torch.bfloat16), DispatchAudit() as audit:
        _step(layer, torch.randn(64, D), ln)
    _, router = _moe_gemms(audit)
    assert router and {g.dtypes[0] for g in router} == {torch.float32}, audit.gemm_dtypes()


def _moe_syncs(audit):
    return [s for s in audit.syncs if s.site.startswith("moe/") or s.site == "<outside the project>"]


@pytest.mark.parametrize("mode, budget", [("capacity_padded", 0), ("capacity", 1), ("dropless", 1)])
def test_host_syncs_per_layer_forward_backward(mode, budget):
    """Budget per MoE layer per micro-batch, forward + backward: 0 in capacity mode with padding (all sizes known on
    the host), 1 otherwise (dispatch.counts_to_host, the split sizes)."""
    layer = _layer(drop_tokens=mode != "dropless", pad=mode == "capacity_padded")
    x = torch.randn(64, D)
    _step(layer, x, nn.Identity())  # warm-up: first-use probes (the MKL interface check) are not per step
    with DispatchAudit() as audit:
        _step(layer, x, nn.Identity())
    assert len(audit.syncs) == budget, audit.report()
    if budget:
        assert audit.syncs[0].site.startswith("moe/dispatch.py") and "counts_to_host" in audit.syncs[0].site


def test_padded_capacity_equals_compact_dispatch():
    """The sync-free padded dispatch (every expert gets C rows, empty slots computed and discarded) gives today's
    results: fp64, outputs and gradients equal up to GEMM summation order (zero rows added to the weight-gradient
    sums)."""
    outs = []
    x = torch.randn(64, D, dtype=torch.float64)
    for pad in (False, True):
        layer = _layer(pad=pad).double()
        xi = x.clone().requires_grad_(True)
        y, stats = layer(xi)
        (y.square().sum() + stats.aux_loss).backward()
        outs.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
        assert float(stats.dropped_fraction) > 0  # capacity factor 1: some pairs really are dropped
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # fp64 summation order only


def _tiny_moe_gpt(drop_tokens):
    from megatron.config import ModelConfig
    from megatron.model import GPTModel

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=D, num_attention_heads=4, ffn_hidden_size=F_, seq_length=16,
                      max_position_embeddings=16, padded_vocab_size=128, hidden_dropout=0.0, attention_dropout=0.0)
    moe_cfg = MoEConfig(num_experts=E, topk=2, expert_interval=1, drop_tokens=drop_tokens)
    return GPTModel(cfg, moe_cfg)


@pytest.mark.parametrize("drop_tokens", [True, False], ids=["capacity", "dropless"])
def test_moe_gpt_training_step_syncs_and_dtypes(drop_tokens):
    """One training step (forward, loss, backward, AdamW) of a 2-layer MoE GPT under bf16 autocast with CUDA's
    LayerNorm rule: every expert GEMM bf16; MoE host syncs: 0 (capacity, padded as on CUDA) or 1 per MoE layer
    (dropless). Syncs elsewhere (loss, optimizer) belong to other audits and are only reported."""
    model = _tiny_moe_gpt(drop_tokens)
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == 2
    for m in moe_layers:
        m.pad_to_capacity = True  # what the CUDA default (None = pad on CUDA) does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, labels = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))

    def step():
        with cuda_autocast_rules(torch.bfloat16):
            out = model(tokens, labels)
            loss = out.loss.float().mean() + 0.01 * sum(s.aux_loss for s in out.moe_stats)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (first-use probes)
    with DispatchAudit() as audit:
        step()
    moe_syncs = [s for s in audit.syncs if s.site.startswith("moe/")]
    assert len(moe_syncs) == (0 if drop_tokens else len(moe_layers)), audit.report()
    expert = [g for g in audit.gemms if g.site.startswith(("moe/experts.py", "moe/ops/"))]
    assert expert and {g.dtypes[0] for g in expert} == {torch.bfloat16}, audit.gemm_dtypes()


@pytest.mark.parametrize("mode", ["capacity_padded", "dropless"])
def test_meta_device_forward_backward(mode, monkeypatch):
    """MoELayer forward + backward on the meta device: a tensor made on the wrong device, an .item() or a
    data-dependent size fails there. Capacity mode with padding runs as is. Dropless mode's one allowed sync (the
    split sizes, dispatch.counts_to_host) cannot run on meta, so the test stands in for it with an even split of
    the rows (its only caller-visible effect: host ints); everything else runs on meta unchanged."""
    with torch.device("meta"):
        layer = _layer(drop_tokens=mode != "dropless", pad=True)
    x = torch.empty(64, D, device="meta", requires_grad=True)
    if mode == "dropless":
        rows = x.shape[0] * 2

        def even_split(*counts):
            return [[rows // c.numel()] * c.numel() if i == 0 else [0] * c.numel() for i, c in enumerate(counts)]

        monkeypatch.setattr(dispatch, "counts_to_host", even_split)
    y, stats = layer(x)
    (y.sum() + stats.aux_loss).backward()
    assert y.device.type == "meta" and x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in layer.parameters())


def test_moe_teacher_in_bf16_under_autocast_with_fp32_input():
    """The MoS flow's teacher: an MoE model with bf16 weights run (eval, no_grad) under the student's bf16 autocast,
    its MoE layer fed LayerNorm's fp32 output (CUDA's rule). Before the fix grouped_mlp_inference's addmm_ refused
    the mixed dtypes; now it runs, and the KD loss equals the fp32 teacher's within bf16 round-off."""
    from moe.distill import DistillConfig, kd_loss

    torch.manual_seed(0)
    V = 64
    emb, ln, head = nn.Embedding(V, D), nn.LayerNorm(D), nn.Linear(D, V, bias=False)
    layer = _layer(drop_tokens=False).eval()
    tokens = torch.randint(0, V, (2, 16))

    def teacher_logits(dtype):
        mods = [m.to(dtype) for m in (emb, ln, layer, head)]
        with torch.no_grad(), cuda_autocast_rules(torch.bfloat16):
            h = mods[0](tokens)
            y, _ = mods[2](mods[1](h))
            return mods[3](h + y).float()

    ref = teacher_logits(torch.float32)
    got = teacher_logits(torch.bfloat16)  # crashed before (fp32 input, bf16 weights)
    student = torch.randn(2, 16, V)
    cfg = DistillConfig(mos=True, load_teacher="/teacher", kd_temp=1.0, kd_alpha_ce=0.0, kd_beta_ce=1.0)
    mask = torch.ones(2, 16)
    _, kd_ref = kd_loss(torch.tensor(0.0), student, ref, mask, cfg)
    _, kd_got = kd_loss(torch.tensor(0.0), student, got, mask, cfg)
    # bf16 weights and GEMMs: each teacher logit carries a few bf16 ulps (2^-8 relative) of error; the KL moves by
    # at most ~|dlogit| ~ 2% of its value here. Bound: 3% relative.
    assert abs(kd_got.item() - kd_ref.item()) <= 0.03 * kd_ref.item(), (kd_got.item(), kd_ref.item())


def test_cache_copy_stream_device_is_explicit(monkeypatch):
    """Offload cache: 'cuda' resolves to the caller's current device index at construction (reader threads would
    otherwise default to device 0)."""
    from moe.offload.cache import _explicit_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _explicit_device("cuda") == torch.device("cuda", 3)
    assert _explicit_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert _explicit_device(None) == torch.device("cpu")


# ---- the sync-free routing helpers equal the tensor forms they replace -------------------------------------------
def test_draws_are_bitwise_torch_distributions():
    """_uniform/_gumbel (torch.rand, no per-call host->device copy) draw DeepSpeed's torch.distributions numbers."""
    from moe.gating import _gumbel, _uniform

    for shape in [(7, 5), (300, 64)]:
        for lo, hi in [(0.99, 1.01), (0.0, 1.0)]:
            torch.manual_seed(1)
            want = torch.distributions.uniform.Uniform(torch.tensor(lo), torch.tensor(hi)).rsample(shape)
            torch.manual_seed(1)
            assert torch.equal(_uniform(lo, hi, shape, "cpu"), want)
        torch.manual_seed(2)
        want = torch.distributions.gumbel.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample(shape)
        torch.manual_seed(2)
        assert torch.equal(_gumbel(shape, "cpu"), want)


def test_expert_capacity_equals_deepspeed_fp32_formula():
    """Python-float capacity == the former tensor formula (DeepSpeed's fp32 product), over many token counts and
    awkward capacity factors (exact: integers)."""
    from moe.gating import expert_capacity

    for T in list(range(1, 300)) + [4095, 4096, 8191, 65536, 1 << 20]:
        for E_, k, cf in [(8, 2, 1.25), (64, 1, 1.0), (7, 3, 1.1), (128, 2, 0.3), (3, 1, 2.0 / 3.0)]:
            want = max(int(torch.ceil((T / E_) * torch.tensor(cf * k)).item()), 4)
            assert expert_capacity(T, E_, k, cf, 4) == want, (T, E_, k, cf)


def test_slot_table_compacts_to_the_former_kept_pairs():
    """assign_slots' [E*C] slot table, compacted (dispatch.compact_slots), is exactly the former boolean-mask
    result: kept pairs grouped by expert, by priority within an expert."""
    from moe.gating import assign_slots

    g = torch.Generator().manual_seed(0)
    T, k, E_, C = 50, 2, 5, 12
    expert_TK = torch.randint(0, E_, (T, k), generator=g)
    priority_TK = torch.rand(T, k, generator=g)
    table, counts, routed = assign_slots(expert_TK, priority_TK, E_, C)
    assert table.shape == (E_ * C,)
    # the former implementation
    expert_P = expert_TK.reshape(-1)
    by_priority = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)
    order = by_priority[torch.argsort(expert_P[by_priority], stable=True)]
    rank = torch.arange(order.numel()) - (torch.cumsum(routed, 0) - routed)[expert_P[order]]
    want = order[rank < C]
    assert torch.equal(dispatch.compact_slots(table, int(counts.sum()), T * k), want)
    assert torch.equal(routed, torch.bincount(expert_P, minlength=E_)) and torch.equal(counts, routed.clamp(max=C))


def test_grouped_kernel_traces_on_meta_in_bf16_only():
    """Finding 6 (--compile traces torch._grouped_mm through its meta kernel, which takes bf16 only): the bf16
    grouped path runs forward + backward on meta (dtype, 16-byte stride and offs rules all checked there), and an
    fp32 call never reaches the kernel, even forced 'on' (the seam refuses it on meta; 'auto' picks it only for CUDA
    bf16)."""
    from moe import experts as ex

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    with torch.device("meta"):
        layer = _layer(pad=True, drop_tokens=True).to(torch.bfloat16)
    layer.experts.grouped_mm = "on"
    x = torch.empty(64, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with DispatchAudit() as audit:
        y, stats = layer(x)
        (y.float().sum() + stats.aux_loss).backward()
    assert {g.op for g in audit.gemms if g.site.startswith(("moe/experts.py", "moe/ops/"))} == {"_grouped_mm"}
    w = torch.empty(E, F_, D, device="meta")
    assert not ex.grouped_mm_ok(torch.empty(8, D, device="meta"), w, "on")
    assert not ex.grouped_mm_ok(torch.empty(8, D, dtype=torch.bfloat16), torch.empty(E, F_, D, dtype=torch.bfloat16),
                                "auto")


def test_pad_to_capacity_config_field_and_constructor_override():
    """--[no-]moe-pad-expert-input-to-capacity -> MoEConfig.pad_to_capacity -> the layer; the constructor argument
    overrides it; None (automatic) pads only CUDA inputs."""
    assert _layer(pad_to_capacity=True).pad_to_capacity is True
    assert _layer(pad_to_capacity=True, pad=False).pad_to_capacity is False
    auto = _layer()
    routing = auto.router(torch.randn(8, D))
    assert auto.pad_to_capacity is None and not auto._padded(torch.empty(8, D), routing)


@pytest.mark.slow  # ~30 s: dynamo + AOT autograd tracing
def test_compile_traces_the_bf16_grouped_path():
    """Finding 6: torch.compile (aot_eager: dynamo + AOT autograd with fake tensors, i.e. the meta kernels the CUDA
    backend also traces) runs the MoE layer's padded capacity path with the bf16 grouped kernel, forward and
    backward, and returns what eager returns (same kernels: bitwise in bf16)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    torch.manual_seed(0)
    layer = _layer(pad=True, second_expert_sampling=False).to(torch.bfloat16)  # no random draws: eager == compiled
    layer.experts.grouped_mm = "on"
    x = torch.randn(64, D, dtype=torch.bfloat16, requires_grad=True)
    y_ref, _ = layer(x)
    y, stats = torch.compile(layer, backend="aot_eager")(x)
    (y.float().sum() + stats.aux_loss).backward()
    assert torch.equal(y, y_ref) and x.grad is not None
