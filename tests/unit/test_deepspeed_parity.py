"""moe.MoE against deepspeed.moe.layer.MoE itself (DeepSpeed 0.19.x): same weights, same torch RNG state before the
call, same outputs, l_aux, exp_counts and gradients. The token-by-token references in test_moe_layer.py stay; this
suite is the drop-in proof. EP=2 against DeepSpeed's EP=2 is in tests/dist/test_deepspeed_parity_ep.py.

Tolerances, and why:
- outputs, expert-parameter gradients: fp64 1e-12 relative (both sides route identically, draw the same random
  numbers in the same order and use bitwise-equal fp32 gates; only the fp64 expert GEMMs' summation order can differ),
  fp32 1e-6.
- l_aux: DeepSpeed computes it in fp32 whatever the input dtype, so 1e-6 relative (it is in fact bitwise equal here).
- exp_counts: exact.
- input and router gradients: DeepSpeed's gate runs in fp32 even for fp64 inputs, and its backward through the
  top-2/top-k renormalisation is a different (mathematically equal) graph of fp32 ops than ours, so the part of the
  gradient that flows through the gates agrees to fp32 rounding only: 1e-6 relative to the largest entry.
"""
import itertools
import logging

import pytest
import torch
from torch import nn

from moe import MoE

deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -r requirements-test.txt)")
from deepspeed.moe.layer import MoE as DeepSpeedMoE  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)

D, FF, E, T = 8, 16, 4, 24


def mlp_expert():
    """DeepSpeed's usual `expert`: a user MLP (tanh GELU, the project's default expert activation)."""
    return nn.Sequential(nn.Linear(D, FF), nn.GELU(approximate="tanh"), nn.Linear(FF, D))


def pair(dtype, builtin=True, **kw):
    """(DeepSpeed MoE, ours with DeepSpeed's weights): ours uses stacked built-in experts, or the same user module."""
    torch.manual_seed(0)
    ds = DeepSpeedMoE(D, mlp_expert(), num_experts=E, **kw).to(dtype)
    with torch.no_grad():
        for p in ds.parameters():  # spread the router and make biases non-zero so every gradient is exercised
            p.normal_(0, 0.5)
    ours = MoE(D, None if builtin else mlp_expert(), num_experts=E, ffn_hidden_size=FF, **kw).to(dtype)
    ours.load_deepspeed_state_dict(ds.state_dict())
    return ds, ours


def run(layer, x, dy, seed):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same RNG state before each side's call: the same noise / RTS / sampling draws
    out, l_aux, counts = layer(x)
    ((out * dy).sum() + l_aux).backward()
    return out.detach(), l_aux.detach(), counts, x.grad


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grads_of_ds(ds, ours):
    """(ours, DeepSpeed) gradient pairs for every parameter, matched as load_deepspeed_state_dict maps them."""
    g = ours.moe
    pairs = [(g.router.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, "router")]
    for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        if hasattr(g.experts, "w1_eFD"):
            mine = [g.experts.w1_eFD.grad[i], g.experts.b1_eF.grad[i], g.experts.w2_eDF.grad[i],
                    g.experts.b2_eD.grad[i]]
        else:
            mine = [p.grad for p in g.experts.experts[i].parameters()]
        pairs += [(m, p.grad, f"expert{i}") for m, p in zip(mine, ex.parameters())]
    if ds.use_residual:
        pairs += [(m.grad, p.grad, "residual") for m, p in zip(g.residual.mlp.parameters(), ds.mlp.parameters())]
        pairs += [(m.grad, p.grad, "coefficient") for m, p in zip(g.residual.coefficient.parameters(),
                                                                    ds.coefficient.parameters())]
    return pairs


def check(ds, ours, dtype, training, seed=3, tokens=T):
    ds.train(training), ours.train(training)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, D, generator=gen).to(dtype)
    dy = torch.randn(2, tokens // 2, D, generator=gen).to(dtype)
    want, got = run(ds, x, dy, seed), run(ours, x, dy, seed)
    tight = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel(got[0], want[0]) <= tight, "output"
    assert rel(got[1], want[1]) <= 1e-6, "l_aux (fp32 in DeepSpeed)"
    assert torch.equal(got[2], want[2]), "exp_counts"
    assert rel(got[3], want[3]) <= 1e-6, "input gradient"
    for mine, theirs, name in grads_of_ds(ds, ours):
        assert (mine is None) == (theirs is None), name
        if theirs is not None:
            assert rel(mine, theirs) <= (1e-6 if name == "router" else tight), name
    return want


# top-1/2/3 x capacity factors x dropping x RTS x train/eval, fp64, no noise (72 small cases); a min_capacity above
# the capacity factor's, the noise policies and fp32 below.
GRID = [(k, cf, 1, drop, rts, training)
        for k, cf, drop, rts, training in itertools.product([1, 2, 3], [1.0, 1.25, 2.0], [True, False], [True, False],
                                                            [True, False])]
GRID += [(k, 1.0, 8, True, rts, training) for k, rts, training in itertools.product([1, 2, 3], [True, False],
                                                                                     [True, False])]


@pytest.mark.parametrize("k, cf, min_capacity, drop_tokens, use_rts, training", GRID)
def test_equals_deepspeed(k, cf, min_capacity, drop_tokens, use_rts, training):
    ds, ours = pair(torch.float64, k=k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=min_capacity,
                    drop_tokens=drop_tokens, use_rts=use_rts)
    check(ds, ours, torch.float64, training)


@pytest.mark.parametrize("policy", [None, "None", "Jitter", "RSample"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_noisy_gate_policies_equal_deepspeed(policy, k, training):
    """Jitter (input noise, training) and RSample (Gumbel logits, top-1 training) draw the same numbers as
    DeepSpeed from the same RNG state; 'None' as a string is accepted as DeepSpeed accepts it."""
    ds, ours = pair(torch.float64, k=k, capacity_factor=1.0, min_capacity=1, noisy_gate_policy=policy)
    check(ds, ours, torch.float64, training)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("sampling", [True, False])
def test_fp32_and_second_expert_sampling_equal_deepspeed(k, sampling):
    ds, ours = pair(torch.float32, k=k, capacity_factor=1.25, min_capacity=2, top2_2nd_expert_sampling=sampling)
    check(ds, ours, torch.float32, training=True)


@pytest.mark.parametrize("builtin", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_residual_moe_equals_deepspeed(builtin, k):
    """use_residual=True (PR-MoE's Residual MoE): the dense branch and 2-way coefficient mixed as DeepSpeed does."""
    ds, ours = pair(torch.float64, builtin=builtin, k=k, use_residual=True, min_capacity=1)
    check(ds, ours, torch.float64, training=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_user_expert_module_equals_deepspeed(k):
    """DeepSpeed's usual call, MoE(hidden, expert=module, ...): the same module deep-copied per expert."""
    ds, ours = pair(torch.float64, builtin=False, k=k, min_capacity=1)
    check(ds, ours, torch.float64, training=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropless_equals_deepspeed_without_its_capacity(k):
    """drop_tokens=False: DeepSpeed pads every expert to the largest expert's count (and all-reduces that count over
    the EP group); we send only the routed tokens and need no capacity. The outputs are still DeepSpeed's, with
    large uneven batches too."""
    ds, ours = pair(torch.float64, k=k, drop_tokens=False)
    check(ds, ours, torch.float64, training=True, tokens=96)


def test_deepspeed_only_arguments():
    with pytest.raises(ValueError, match="enable_expert_tensor_parallelism=True needs tp_group="):
        MoE(D, mlp_expert(), num_experts=E, enable_expert_tensor_parallelism=True)
    layer = MoE(D, mlp_expert(), num_experts=E, use_tutel=True)  # accepted, ignored (a warning once)
    layer.set_deepspeed_parallelism()  # DeepSpeed's group hook: a no-op here
    out, l_aux, counts = layer(torch.randn(3, 4, D))
    assert out.shape == (3, 4, D) and counts.dtype == torch.int64 and l_aux.dtype == torch.float32
