"""MoELayer against an independent token-by-token float64 reference written below with plain loops."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe import MoE, MoEConfig, MoELayer
from moe.experts import grouped_mlp, is_expert_param
from tests.conftest import ROOT

D, FF = 6, 10


# ---- independent reference (plain loops, no shared code with moe/) ----------------------------------

def params_of(layer):
    """(router W [E, D], w1 [E, F, D], b1, w2 [E, D, F], b2) of a single-rank MoELayer with built-in experts."""
    ex = layer.experts
    return layer.router.weight, ex.w1_eFD, ex.b1_eF, ex.w2_eDF, ex.b2_eD


def expert_mlp(x_D, w1, b1, w2, b2, e):
    return F.gelu(x_D @ w1[e].t() + b1[e], approximate="tanh") @ w2[e].t() + b2[e]


def route(x_TD, wg, k):
    """Per-token routing (fp32 router as DeepSpeed's, no noise): (probs [T, E], chosen expert lists, probs of the
    chosen). k=2: the second choice is the largest logit after the first (DeepSpeed's argmax without sampling)."""
    probs = torch.softmax(x_TD.float() @ wg.float().t(), dim=-1)
    chosen, gates = [], []
    for t in range(x_TD.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda e: -float(probs[t, e].detach()))[:k]
        chosen.append(order)
        gates.append([probs[t, e] for e in order])
    return probs, chosen, gates


def kept_pairs(probs, chosen, capacity, policy="probs"):
    """Set of kept (t, j) pairs: per expert the `capacity` pairs with the highest router probability ('probs'), or
    the first ones when all first choices (in token order) come before all second choices ('position')."""
    if capacity is None:
        return {(t, j) for t in range(len(chosen)) for j in range(len(chosen[t]))}
    kept = set()
    for e in range(probs.shape[1]):
        pairs = [(t, j) for t in range(len(chosen)) for j in range(len(chosen[t])) if chosen[t][j] == e]
        if policy == "probs":
            pairs.sort(key=lambda tj: -float(probs[tj[0], e].detach()))
        else:
            pairs.sort(key=lambda tj: (tj[1], tj[0]))
        kept.update(pairs[:capacity])
    return kept


def reference_moe(x_TD, wg, w1, b1, w2, b2, k, capacity=None, policy="probs", renormalize="after_drop"):
    """y_t = Σ_{kept (t, j)} gate_tj · expert_{e_tj}(x_t), token by token; k >= 2 gates are p_tj divided by the sum
    over the kept choices ('after_drop') or all k ('before_drop')."""
    probs, chosen, gates = route(x_TD, wg, k)
    kept = kept_pairs(probs, chosen, capacity, policy)
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        js = [j for j in range(k) if (t, j) in kept] if renormalize == "after_drop" else list(range(k))
        total = sum(gates[t][j] for j in js) if k >= 2 else 1.0
        for j, e in enumerate(chosen[t]):
            if (t, j) in kept:
                y = y + gates[t][j] / total * expert_mlp(x_TD[t], w1, b1, w2, b2, e)
        rows.append(y)
    return torch.stack(rows), probs, chosen, kept


def capacity_formula(T, E, k, cf, min_capacity):
    return max(math.ceil(T / E * (k * cf)), min_capacity)




def make_layer(E, k, seed=0, **cfg_kwargs):
    """fp64 layer; no second-expert sampling and probability drop priority unless asked (the reference has none)."""
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, topk=k, **{"second_expert_sampling": False, "drop_policy": "probs", **cfg_kwargs})
    layer = MoELayer(D, FF, E, cfg).double()
    with torch.no_grad():  # non-zero biases so their gradients are exercised
        for p in (layer.experts.b1_eF, layer.experts.b2_eD):
            p.normal_(0, 0.1)
        layer.router.weight.normal_(0, 1.0)  # spread-out router probabilities: no near-ties
    return layer


def reference_clone(layer):
    return [p.detach().clone().requires_grad_(True) for p in params_of(layer)]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["dropless", "huge_capacity"])
def test_no_drop_equals_reference_outputs_and_grads(k, mode):
    E, T = 5, 13
    kwargs = dict(drop_tokens=False) if mode == "dropless" else dict(train_capacity_factor=100.0)
    layer = make_layer(E, k, **kwargs)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y, stats = layer(x)
    assert float(stats.dropped_fraction) == 0.0

    ref = reference_clone(layer)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, *_ = reference_moe(x_ref, *ref, k=k)
    # float64 experts on both sides, the same fp32 router: only summation-order differences remain. k=3: the
    # renormalising sum of three fp32 probabilities is taken in another order here (over the dense [T, E] row, as
    # DeepSpeed), which can differ by one fp32 rounding (~1e-7 relative) from the reference's.
    tol = dict(rtol=1e-10, atol=1e-12) if k <= 2 else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(y, y_ref, **tol)

    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for p, p_ref in zip(params_of(layer), ref):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol)


@pytest.mark.parametrize("policy, renormalize", [("probs", "after_drop"), ("position", "after_drop"),
                                                 ("probs", "before_drop")])
@pytest.mark.parametrize("k, cf", [(1, 1.0), (1, 0.5), (2, 1.0), (2, 0.75)])
def test_dropping_per_expert_counts_and_zero_output(k, cf, policy, renormalize):
    E, T = 4, 24
    layer = make_layer(E, k, train_capacity_factor=cf, min_capacity=1, use_rts=False, drop_policy=policy,
                       renormalize=renormalize)
    x = torch.randn(T, D, dtype=torch.float64)
    routing = layer.router(x)
    C = capacity_formula(T, E, k, cf, 1)
    assert routing.capacity == C
    routed = torch.bincount(routing.expert_TK.reshape(-1), minlength=E)
    assert torch.equal(routing.tokens_per_expert_E, routed)
    assert torch.equal(routing.counts_E, routed.clamp(max=C))  # exactly max(0, routed - C) dropped
    dropped = float((routed - routed.clamp(max=C)).sum()) / (T * k)
    assert math.isclose(float(routing.dropped_fraction), dropped, rel_tol=1e-6)  # fp32 scalar

    y, _ = layer(x)
    y_ref, _, chosen, kept = reference_moe(x, *[p.detach() for p in params_of(layer)], k=k, capacity=C,
                                           policy=policy, renormalize=renormalize)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)  # includes which pairs are kept
    assert len(kept) < T * k, "test data should drop some pairs"
    fully_dropped = [t for t in range(T) if not any((t, j) in kept for j in range(k))]
    if k == 1:
        assert fully_dropped, "test data should drop some tokens entirely"
    assert torch.all(y[fully_dropped] == 0)  # a token dropped by all its experts gets exactly 0


def test_rts_drops_exact_counts_and_is_random():
    E, T, k = 4, 32, 1
    layer = make_layer(E, k, train_capacity_factor=0.5, min_capacity=1, use_rts=True)
    x = torch.randn(T, D, dtype=torch.float64)
    torch.manual_seed(1)
    r1 = layer.router(x)
    torch.manual_seed(2)
    r2 = layer.router(x)
    C = capacity_formula(T, E, k, 0.5, 1)
    routed = torch.bincount(r1.expert_TK[:, 0], minlength=E)
    assert torch.equal(r1.counts_E, routed.clamp(max=C)) and torch.equal(r2.counts_E, r1.counts_E)
    assert not torch.equal(r1.pair_idx_N, r2.pair_idx_N)


def test_eval_capacity_factor_and_min_capacity():
    E, T, k = 4, 16, 1
    layer = make_layer(E, k, train_capacity_factor=0.5, eval_capacity_factor=2.0, min_capacity=1)
    x = torch.randn(T, D, dtype=torch.float64)
    assert layer.router(x).capacity == capacity_formula(T, E, k, 0.5, 1) == 2
    layer.eval()
    assert layer.router(x).capacity == capacity_formula(T, E, k, 2.0, 1) == 8
    layer.train()
    layer_min = make_layer(E, k, train_capacity_factor=0.5, min_capacity=7)
    assert layer_min.router(x).capacity == 7


def test_aux_and_z_loss_by_hand():
    E, T, k = 4, 10, 2
    layer = make_layer(E, k, drop_tokens=False, z_loss_coeff=1e-3)
    x = torch.randn(T, D, dtype=torch.float64)
    _, stats = layer(x)
    logits = x.float() @ layer.router.weight.detach().float().t()  # the fp32 router
    probs = torch.softmax(logits, dim=-1).double()
    top1 = probs.argmax(dim=-1)
    aux = 0.0
    for e in range(E):  # GShard: E * Σ_e mean prob_e * fraction of tokens whose top-1 choice is e
        aux += probs[:, e].mean() * (top1 == e).double().mean()
    # fp32 losses (as DeepSpeed's l_aux): a few fp32 roundings apart
    torch.testing.assert_close(stats.aux_loss.double(), E * aux, rtol=1e-6, atol=0)
    z = sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / T
    torch.testing.assert_close(stats.z_loss.double(), torch.tensor(z, dtype=torch.float64), rtol=1e-6, atol=0)
    routed = torch.bincount(torch.topk(probs, k).indices.reshape(-1), minlength=E)
    assert torch.equal(stats.tokens_per_expert, routed)


def test_one_expert_equals_dense_mlp():
    layer = make_layer(1, 1)  # softmax over one expert = 1 and C = ceil(T) >= T: nothing dropped
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    y, stats = layer(x)
    ex = layer.experts
    dense = F.gelu(x @ ex.w1_eFD[0].t() + ex.b1_eF[0], approximate="tanh") @ ex.w2_eDF[0].t() + ex.b2_eD[0]
    assert y.shape == x.shape
    torch.testing.assert_close(y, dense, rtol=1e-12, atol=1e-12)
    assert float(stats.aux_loss.detach()) == pytest.approx(1.0)


def test_user_expert_module_equals_builtin():
    E, k, T = 3, 2, 11
    layer = make_layer(E, k, drop_tokens=False)
    user = MoELayer(D, FF, E, layer.cfg, expert=nn.Sequential(nn.Linear(D, FF), nn.GELU(approximate="tanh"),
                                                              nn.Linear(FF, D)))
    user = user.double()
    with torch.no_grad():
        user.router.weight.copy_(layer.router.weight)
        for i, seq in enumerate(user.experts.experts):
            seq[0].weight.copy_(layer.experts.w1_eFD[i]); seq[0].bias.copy_(layer.experts.b1_eF[i])
            seq[2].weight.copy_(layer.experts.w2_eDF[i]); seq[2].bias.copy_(layer.experts.b2_eD[i])
    x = torch.randn(T, D, dtype=torch.float64)
    torch.testing.assert_close(user(x)[0], layer(x)[0], rtol=1e-12, atol=1e-12)
    tagged = [p for p in user.parameters() if is_expert_param(p)]
    assert len(tagged) == 4 * E and {p.local_expert_index for p in tagged} == {0, 1, 2}
    assert not is_expert_param(user.router.weight)


def test_expert_param_tags_and_init_per_slice():
    calls = []

    def init(w):
        calls.append(tuple(w.shape))
        w.normal_(0, 0.02)

    def out_init(w):
        calls.append(("out",) + tuple(w.shape))
        w.normal_(0, 0.002)

    layer = MoELayer(8, 32, 4, MoEConfig(num_experts=4), init_method=init, output_layer_init_method=out_init)
    assert calls.count((32, 8)) == 4 and calls.count(("out", 8, 32)) == 4 and calls.count((4, 8)) == 1
    for p in layer.experts.parameters():
        assert is_expert_param(p) and p.num_local_experts == 4 and p.shape[0] == 4
    assert not is_expert_param(layer.router.weight)


def test_grouped_mlp_gradcheck_with_empty_experts():
    torch.manual_seed(0)
    counts = (3, 0, 2, 0)
    dd = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(5, 3, **dd), counts, torch.randn(4, 4, 3, **dd), torch.randn(4, 4, **dd),
            torch.randn(4, 3, 4, **dd), torch.randn(4, 3, **dd))
    assert torch.autograd.gradcheck(grouped_mlp, args)


@pytest.mark.parametrize("policy", ["Jitter", "RSample"])
def test_noise_only_in_training(policy):
    k = 2 if policy == "Jitter" else 1  # RSample acts on top-1 routers only (DeepSpeed's top1gating)
    layer = make_layer(4, k, drop_tokens=False, noisy_gate_policy=policy)
    x = torch.randn(64, D, dtype=torch.float64)
    clean = make_layer(4, k, drop_tokens=False)
    layer.eval(), clean.eval()
    torch.testing.assert_close(layer(x)[0], clean(x)[0])
    layer.train()
    torch.manual_seed(0)
    r1 = layer.router(x).expert_TK
    torch.manual_seed(1)
    r2 = layer.router(x).expert_TK
    if policy == "RSample":  # Gumbel noise changes choices
        assert not torch.equal(r1, r2)
    else:  # Jitter: the fp32 router input times U(0.99, 1.01) drawn from the torch RNG, choices and gates alike
        torch.manual_seed(0)
        u = torch.rand(x.shape) * 0.02 + 0.99  # DeepSpeed's Uniform(0.99, 1.01).rsample: low + rand * (high - low)
        probs = torch.softmax((x.float() * u) @ layer.router.weight.float().t(), dim=-1)
        torch.manual_seed(0)
        got = layer.router(x)
        assert torch.equal(got.expert_TK, probs.topk(2, dim=-1).indices)
        want = probs.gather(1, got.expert_TK)
        torch.testing.assert_close(got.gates_TK, want / want.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)  # fp32
        layer.eval()
        assert not torch.allclose(got.gates_TK, layer.router(x).gates_TK, rtol=0, atol=1e-6)  # the noise acted


def test_deepspeed_style_wrapper():
    torch.manual_seed(0)
    layer = MoE(hidden_size=8, expert=None, num_experts=4, ep_size=1, k=2, capacity_factor=1.25,
                eval_capacity_factor=2.0, min_capacity=4, noisy_gate_policy="RSample", drop_tokens=True,
                use_rts=True, ffn_hidden_size=16, top2_2nd_expert_sampling=False)
    x = torch.randn(3, 5, 8, requires_grad=True)
    out, l_aux, exp_counts = layer(x)
    assert out.shape == x.shape and l_aux.dim() == 0 and exp_counts.shape == (4,)
    assert int(exp_counts.sum()) == 3 * 5 * 2
    (out.sum() + l_aux).backward()
    assert x.grad is not None and layer.moe.router.weight.grad is not None
    # eval (no noise, eval capacity 2.0: C = max(ceil(2*15/4*2), 4) = 15, nothing dropped): the token-by-token
    # reference, and the GShard aux loss and routed counts by hand
    layer.double().eval()
    x64 = x.detach().double()
    with torch.no_grad():
        out, l_aux, exp_counts = layer(x64)
    ref, probs, chosen, _ = reference_moe(x64.reshape(15, 8), *params_of(layer.moe), 2)
    torch.testing.assert_close(out.reshape(15, 8), ref, rtol=1e-10, atol=1e-12)  # float64: rounding only
    counts = torch.bincount(torch.tensor([e for c in chosen for e in c]), minlength=4)
    assert torch.equal(exp_counts, counts)
    first = torch.bincount(torch.tensor([c[0] for c in chosen]), minlength=4).float() / 15
    torch.testing.assert_close(l_aux, 4 * (probs.mean(0) * first).sum(), rtol=1e-6, atol=1e-7)  # fp32 l_aux


def test_bf16_input_keeps_fp32_router():
    layer = MoELayer(8, 16, 4, MoEConfig(num_experts=4, topk=2)).to(torch.bfloat16)
    x = torch.randn(10, 8, dtype=torch.bfloat16)
    y, stats = layer(x)
    assert y.dtype == torch.bfloat16 and stats.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (False, True), (True, False)])
def test_batched_mm_backends_agree(dtype, trans_a, trans_b):
    from moe.experts import _MKL_BATCH, batched_mm
    if not _MKL_BATCH.fns:
        pytest.skip("this torch build does not export cblas_?gemm_batch; only the torch.mm loop runs")
    torch.manual_seed(0)
    counts = [3, 0, 5, 1]
    off = [0, 3, 3, 8, 9]
    A = torch.randn(9, 4, dtype=dtype)
    if trans_a:  # C_i = A_i^T @ B_i  ([4, n_i] x [n_i, 6] -> [4, 6])
        B, shapes = torch.randn(9, 6, dtype=dtype), [(4, 6)] * 4
        a = [A[off[i]:off[i + 1]] for i in range(4)]
        b = [B[off[i]:off[i + 1]] for i in range(4)]
    else:  # C_i = A_i @ op(B_i)  ([n_i, 4] x [4, 6] -> [n_i, 6])
        W = torch.randn(4, 6, 4, dtype=dtype) if trans_b else torch.randn(4, 4, 6, dtype=dtype)
        a, b, shapes = [A[off[i]:off[i + 1]] for i in range(4)], list(W), [(n, 6) for n in counts]
    outs = []
    for use_mkl in (True, False):
        C = [torch.full(s, 7.0, dtype=dtype) for s in shapes]
        batched_mm(a, b, C, trans_a=trans_a, trans_b=trans_b, beta=0.0, use_mkl=use_mkl)
        outs.append(C)
    for c_mkl, c_loop, ai, bi in zip(*outs, a, b):
        ref = (ai.t() if trans_a else ai) @ (bi.t() if trans_b else bi)
        torch.testing.assert_close(c_mkl, ref)  # an empty reduction gives zeros, not the old 7s
        torch.testing.assert_close(c_loop, ref)


def test_weight_grad_buffer_reused_only_when_free():
    layer = make_layer(4, 1, use_rts=False)
    x = torch.randn(20, D, dtype=torch.float64)
    layer(x)[0].sum().backward()
    g1 = layer.experts.w1_eFD.grad
    g1_copy = g1.clone()
    layer.zero_grad(set_to_none=True)
    layer(x)[0].sum().backward()  # g1 is still referenced here: a new buffer must be used
    assert layer.experts.w1_eFD.grad.data_ptr() != g1.data_ptr() and torch.equal(g1, g1_copy)
    del g1
    ptr = layer.experts.w1_eFD.grad.data_ptr()
    layer.zero_grad(set_to_none=True)
    layer(x)[0].sum().backward()  # nobody holds the old gradient: its memory is reused
    assert layer.experts.w1_eFD.grad.data_ptr() == ptr
    layer(x)[0].sum().backward()  # grads not reset: autograd accumulates as usual
    torch.testing.assert_close(layer.experts.w1_eFD.grad, 2 * g1_copy)


@pytest.mark.parametrize("trans_a", [False, True])
def test_batched_mm_splits_few_large_gemms_correctly(trans_a):
    from moe.experts import _MKL_BATCH, batched_mm
    if not _MKL_BATCH.fns:
        pytest.skip("this torch build does not export cblas_?gemm_batch")
    torch.manual_seed(0)
    m_sizes = [300, 0, 150]  # few groups, many rows: split into row pieces across threads
    if trans_a:  # C_i [m_i, 8] = A_i^T @ B_i with A_i [5, m_i]
        a = [torch.randn(5, m, dtype=torch.float64) for m in m_sizes]
        b = [torch.randn(5, 8, dtype=torch.float64) for _ in m_sizes]
    else:
        a = [torch.randn(m, 5, dtype=torch.float64) for m in m_sizes]
        b = [torch.randn(5, 8, dtype=torch.float64) for _ in m_sizes]
    c = [torch.ones(m, 8, dtype=torch.float64) for m in m_sizes]
    batched_mm(a, b, c, trans_a=trans_a, beta=0.5)
    for ai, bi, ci in zip(a, b, c):
        torch.testing.assert_close(ci, (ai.t() if trans_a else ai) @ bi + 0.5)


def test_recycled_buffers_safe_with_two_forwards_in_flight():
    """forward(x1), forward(x2), then both backwards (as with activation checkpointing or several
    micro-batches in flight): buffers still saved by the first graph must not be handed to the second."""
    layer = make_layer(4, 2, drop_tokens=False)
    x1, x2 = torch.randn(9, D, dtype=torch.float64), torch.randn(7, D, dtype=torch.float64)

    def grads(recycle):
        layer.zero_grad(set_to_none=True)
        layer.experts.recycler.enabled = recycle
        for _ in range(2):  # second pass runs with buffers left over from the first
            layer.zero_grad(set_to_none=True)
            y1, y2 = layer(x1)[0], layer(x2)[0]
            out = (y1 * 1.5).sum() + (y2 ** 2).sum()
            out.backward()
        return out.detach(), [p.grad.clone() for p in layer.parameters()]

    out_ref, ref = grads(False)
    out, got = grads(True)
    assert torch.equal(out, out_ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_rts_scope_train_keeps_eval_deterministic_and_top1_scope_draws_in_eval():
    """rts_scope='train': RTS randomises drop priority only in training; eval draws no RNG. rts_scope='top1'
    (DeepSpeed): top-1 eval also drops by RTS uniforms, so it draws from the RNG."""
    from moe import MoELayer, MoEConfig

    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, MoEConfig(num_experts=4, topk=1, eval_capacity_factor=0.5, use_rts=True,
                                          rts_scope="train")).eval()
    x = torch.randn(64, 16)
    state = torch.get_rng_state()
    y1, s1 = layer(x)
    assert torch.equal(torch.get_rng_state(), state)
    y2, _ = layer(x)
    assert torch.equal(y1, y2) and float(s1.dropped_fraction) > 0
    ds = MoELayer(16, 32, 4, MoEConfig(num_experts=4, topk=1, eval_capacity_factor=0.5, use_rts=True)).eval()
    state = torch.get_rng_state()
    ds(x)
    assert not torch.equal(torch.get_rng_state(), state)


def test_cpu_fast_paths_one_switch_probe_and_module_buffers():
    """MOE_CPU_FAST_PATHS=0 turns off both the MKL batch call and buffer recycling; a foreign-call interface that
    computes wrong numbers fails its probe (the torch.mm loop is used); `experts.buffers()` is nn.Module's."""
    import subprocess
    import sys

    from moe.experts import BufferRecycler, _MklBatch

    code = ("import moe.experts as m; print(m.CPU_FAST_PATHS, bool(m._MKL_BATCH.fns), m.BufferRecycler.enabled)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MOE_CPU_FAST_PATHS": "0"}, cwd=ROOT).stdout.split()
    assert out == ["False", "False", "False"]
    probe = _MklBatch()
    if probe.fns:
        assert probe._probe()  # the real interface passes

        class Broken(_MklBatch):
            def __call__(self, a_list, b_list, c_list, trans_a, trans_b, beta):
                super().__call__(a_list, b_list, c_list, not trans_a, trans_b, beta)  # e.g. a wrong flag value

        broken = Broken()
        assert not broken._probe() and not broken.supports(torch.zeros(2, 2))
    # recycling is CPU only: other devices get a fresh allocation
    r = BufferRecycler()
    meta = r.empty("k", (4, 4), torch.empty(0, device="meta"))
    assert meta.device.type == "meta" and "k" not in r._cache
    layer = make_layer(4, 2, drop_tokens=False)
    assert list(layer.experts.buffers()) == []


def test_one_expert_equals_the_models_parallel_mlp():
    """One expert with the weights of the model's own dense MLP (megatron.model.mlp.ParallelMLP, the module the GPT
    model builds) computes the same function, for each activation; fp64, equal to summation order."""
    from megatron.model.mlp import ParallelMLP

    for activation in ("gelu_tanh", "gelu"):
        torch.manual_seed(0)
        dense = ParallelMLP(D, FF, nn.init.normal_, nn.init.normal_, activation=activation).double()
        with torch.no_grad():
            dense.dense_h_to_4h.bias.normal_(), dense.dense_4h_to_h.bias.normal_()
        layer = MoELayer(D, FF, 1, MoEConfig(num_experts=1), activation=activation).double()
        with torch.no_grad():
            layer.experts.w1_eFD[0].copy_(dense.dense_h_to_4h.weight), layer.experts.b1_eF[0].copy_(dense.dense_h_to_4h.bias)
            layer.experts.w2_eDF[0].copy_(dense.dense_4h_to_h.weight), layer.experts.b2_eD[0].copy_(dense.dense_4h_to_h.bias)
        x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
        y_moe = layer(x)[0]
        y_dense = dense(x)[0]
        torch.testing.assert_close(y_moe, y_dense, rtol=1e-13, atol=1e-14)  # GEMM summation order only
        with torch.no_grad():  # the inference path (per-expert GEMMs) too
            torch.testing.assert_close(layer(x)[0], y_dense, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_loop(device, dtype, monkeypatch):
    """The torch._grouped_mm seam (forced on where it runs: torch 2.13 has a CPU kernel too) computes the per-expert
    loop's outputs and gradients, empty experts included. fp32: summation order only; bf16: bf16 rounding."""
    import moe.experts as ex

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    e, Dm, Fm, counts = 4, 16, 32, (5, 0, 9, 3)
    w = [torch.randn(e, Fm, Dm), torch.randn(e, Fm), torch.randn(e, Dm, Fm), torch.randn(e, Dm)]
    x = torch.randn(sum(counts), Dm)
    dy = torch.randn(sum(counts), Dm)
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setattr(ex, "GROUPED_MM", mode)
        args = [t.to(device, dtype).requires_grad_(True) for t in [x] + w]
        y = ex.grouped_mlp(args[0], counts, *args[1:])
        (y.float() * dy.to(device)).sum().backward()
        results[mode] = [y.detach().float().cpu()] + [a.grad.float().cpu() for a in args]
    monkeypatch.setattr(ex, "GROUPED_MM", "on")
    assert ex._grouped_mm_ok(x.to(device, dtype), w[0].to(device, dtype))  # the grouped kernel really ran
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-1)
    for got, want in zip(results["on"], results["off"]):
        torch.testing.assert_close(got, want, **tol)
