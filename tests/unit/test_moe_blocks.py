"""Modern MoE experts (issue 25): SwiGLU experts against a float64 per-expert loop, the shared expert and the
whole Qwen2-MoE sparse block against transformers on copied weights, and MoEConfig.layer_plan (--moe-layer-freq)."""
import pytest
import torch
import torch.nn.functional as F

import moe.experts as ex
from moe.config import MoEConfig, parse_layer_freq
from moe.experts import GroupedMLPExperts
from moe.layer import MoELayer

E, D, FF = 4, 16, 24
COUNTS = (5, 0, 9, 3)


def _loop_swiglu(x, w1, b1, w2, b2, counts):
    """The reference: one expert at a time, silu(gate) * up with gate/up the two halves of w1's rows."""
    out, start = [], 0
    for i, n in enumerate(counts):
        h = x[start:start + n] @ w1[i].t() + b1[i]
        gate, up = h.chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ w2[i].t() + b2[i])
        start += n
    return torch.cat(out)


def _experts(dtype=torch.float64, bias=True) -> GroupedMLPExperts:
    torch.manual_seed(0)
    experts = GroupedMLPExperts(E, D, FF, torch.nn.init.normal_, torch.nn.init.normal_, activation="swiglu",
                                bias=bias).to(dtype)
    with torch.no_grad():
        for b in (experts.b1_eF, experts.b2_eD):
            b.normal_()
    return experts


@pytest.mark.parametrize("grouped_mm", ["off", "on"])
def test_swiglu_experts_equal_float64_loop(monkeypatch, grouped_mm):
    """Training path (one grouped op, gate and up fused in w1 [e, 2F, D]) and inference path against the loop.
    float64 with the batched path: 1e-12 (only summation order differs); the torch._grouped_mm path runs fp32
    (its dtypes): rtol 1e-5 / atol 1e-4 for O(10) values, fp32 round-off."""
    if grouped_mm == "on" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    monkeypatch.setattr(ex, "GROUPED_MM", grouped_mm)
    dtype = torch.float64 if grouped_mm == "off" else torch.float32
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    experts = _experts(dtype)
    assert experts.w1_eFD.shape == (E, 2 * FF, D) and experts.w2_eDF.shape == (E, D, FF)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(COUNTS), D, generator=g, dtype=torch.float64)
    dy = torch.randn(sum(COUNTS), D, generator=g, dtype=torch.float64)
    ref = [t.detach().double().clone().requires_grad_(True)
           for t in (x, experts.w1_eFD, experts.b1_eF, experts.w2_eDF, experts.b2_eD)]
    want = _loop_swiglu(*ref, COUNTS)
    (want * dy).sum().backward()
    xi = x.to(dtype).requires_grad_(True)
    got = experts(xi, COUNTS)
    (got * dy.to(dtype)).sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), **tol)
    for p, r in zip((xi, experts.w1_eFD, experts.b1_eF, experts.w2_eDF, experts.b2_eD), ref):
        torch.testing.assert_close(p.grad.double(), r.grad, **tol)
    with torch.no_grad():  # inference: one expert at a time (the path expert offload matches bitwise)
        torch.testing.assert_close(experts(x.to(dtype), COUNTS).double(), want.detach(), **tol)


def test_disable_bias_linear_freezes_expert_biases():
    experts = _experts(bias=False)
    assert not experts.b1_eF.requires_grad and not experts.b2_eD.requires_grad
    x = torch.randn(sum(COUNTS), D, dtype=torch.float64, requires_grad=True)
    experts(x, COUNTS).sum().backward()
    assert experts.b1_eF.grad is None and experts.w1_eFD.grad is not None


def _qwen2_moe(shared_gate_seed=5):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=FF, shared_expert_intermediate_size=40,
                        num_experts=E, num_experts_per_tok=2, norm_topk_prob=True, hidden_act="silu")
    block = Qwen2MoeSparseMoeBlock(hf)
    g = torch.Generator().manual_seed(shared_gate_seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return block


def test_shared_expert_and_block_equal_qwen2_moe():
    """Qwen2MoeSparseMoeBlock = softmax top-2 (renormalised) SwiGLU experts + sigmoid-gated SwiGLU shared expert:
    with dropless routing and no 2nd-expert sampling MoELayer is the same function. fp32 both sides: 1e-5."""
    pytest.importorskip("transformers")
    block = _qwen2_moe()
    cfg = MoEConfig(num_experts=E, topk=2, drop_tokens=False, second_expert_sampling=False,
                    shared_expert_ffn_hidden_size=40, shared_expert_gate=True)
    layer = MoELayer(D, FF, E, cfg, activation="swiglu", bias=False)
    se = layer.shared_expert
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.experts.w1_eFD.copy_(block.experts.gate_up_proj)
        layer.experts.w2_eDF.copy_(block.experts.down_proj)
        se.mlp.dense_h_to_4h.weight.copy_(torch.cat((block.shared_expert.gate_proj.weight,
                                                     block.shared_expert.up_proj.weight)))
        se.mlp.dense_4h_to_h.weight.copy_(block.shared_expert.down_proj.weight)
        se.gate.weight.copy_(block.shared_expert_gate.weight)
    x1 = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    tol = dict(rtol=1e-5, atol=1e-5)
    # the shared path alone: Qwen2's shared_expert scaled by sigmoid(shared_expert_gate(x))
    want_shared = torch.sigmoid(block.shared_expert_gate(x1)) * block.shared_expert(x1)
    torch.testing.assert_close(se(x2), want_shared, **tol)
    y1 = block(x1)
    y2, _ = layer(x2)
    torch.testing.assert_close(y2, y1, **tol)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **tol)
    torch.testing.assert_close(layer.experts.w1_eFD.grad, block.experts.gate_up_proj.grad, **tol)
    torch.testing.assert_close(layer.experts.w2_eDF.grad, block.experts.down_proj.grad, **tol)
    torch.testing.assert_close(se.gate.weight.grad, block.shared_expert_gate.weight.grad, **tol)
    torch.testing.assert_close(se.mlp.dense_4h_to_h.weight.grad, block.shared_expert.down_proj.weight.grad, **tol)


def test_ungated_shared_expert_is_added():
    cfg = MoEConfig(num_experts=E, topk=1, drop_tokens=False, shared_expert_ffn_hidden_size=8)
    with_shared = MoELayer(D, FF, E, cfg).double()
    x = torch.randn(5, D, dtype=torch.float64)
    y, _ = with_shared(x)
    routed = with_shared.forward_local(x, with_shared.router(x))
    torch.testing.assert_close(y, routed + with_shared.shared_expert.mlp(x), rtol=1e-12, atol=1e-12)
    assert with_shared.shared_expert.gate is None


# ------------------------------------------------------------------------------------------------ layer plan
def test_layer_plan_interval_rule_is_deepspeeds():
    plan = MoEConfig(num_experts=(4, 8), expert_interval=2).layer_plan(4)
    assert [None if s is None else tuple(s) for s in plan] == [None, (0, 4, 1), None, (1, 8, 1)]


@pytest.mark.parametrize("text,want", [
    ("1", [1, 1, 1, 1]), ("2", [1, 0, 1, 0]), ("([0]*1+[1]*3)", [0, 1, 1, 1]), ("[1,0,0,1]", [1, 0, 0, 1])])
def test_layer_freq_is_megatrons(text, want):
    """Megatron-LM: an int N puts MoE on layers 0, N, 2N, ... (0-based); a list gives 0/1 per layer."""
    plan = MoEConfig(num_experts=4, layer_freq=parse_layer_freq(text)).layer_plan(4)
    assert [int(s is not None) for s in plan] == want
    assert [s.moe_index for s in plan if s is not None] == list(range(sum(want)))


@pytest.mark.parametrize("kw,num_layers,match", [
    (dict(layer_freq=(0, 1, 1)), 4, r"--moe-layer-freq lists 3 layers but --num-layers is 4"),
    (dict(expert_interval=8), 4, r"needs at least one MoE layer"),
    (dict(num_experts=(4, 4, 4)), 4, r"--num-experts has 3 values; give one, or one per MoE layer \(2 with"),
])
def test_layer_plan_errors(kw, num_layers, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{"num_experts": 4, **kw}).layer_plan(num_layers)


@pytest.mark.parametrize("text", ["[0]*2+__import__('os')", "[2, 1]", "x", "[0, 0]"])
def test_layer_freq_parse_errors_are_one_line(text):
    with pytest.raises(ValueError, match=r"--moe-layer-freq"):
        MoEConfig(num_experts=4, layer_freq=parse_layer_freq(text))


def test_offload_store_reads_the_plan():
    """megatron/offload.py's per-layer expert counts come from the recorded config's layer plan."""
    from megatron.offload import moe_layer_sizes

    configs = {"model": {"num_layers": 4}, "moe": {"num_experts": [4, 8, 2], "layer_freq": [0, 1, 1, 1]}}
    assert moe_layer_sizes(configs) == (4, 8, 2)
    assert moe_layer_sizes({"model": {"num_layers": 4}, "moe": {"num_experts": [3], "expert_interval": 2}}) == (3, 3)
