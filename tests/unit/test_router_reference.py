"""The megatron-core router family against a float64 brute-force loop over tokens, for every router option; its
one-line errors for impossible combinations; and the router's dtype under a bf16 autocast (issue 23, finding 3)."""
import itertools
import math

import pytest
import torch

from megatron.audit import DispatchAudit
from moe.config import MoEConfig
from moe.gating import TopKRouter, step_routers

E, D = 8, 6


def reference(x_TD, w_ED, cfg: MoEConfig, bias_E, num_sequences):
    """Per token, in float64 Python: (gates {t: {expert: weight}} of kept pairs, aux loss, z loss)."""
    x, w = x_TD.double().tolist(), w_ED.double().tolist()
    T, k = len(x), cfg.topk
    logits = [[sum(a * b for a, b in zip(xt, we)) for we in w] for xt in x]
    routed = []  # per token: {expert: weight} before capacity
    for lt in logits:
        m = max(lt)
        soft = [math.exp(v - m) / sum(math.exp(u - m) for u in lt) for v in lt]
        sig = [1 / (1 + math.exp(-v)) for v in lt]
        if cfg.score_function == "softmax":
            choice = soft if cfg.pre_softmax else lt
        else:
            choice = [s + (bias_E[e] if bias_E is not None else 0.0) for e, s in enumerate(sig)]
        allowed = range(E)
        if cfg.group_topk:
            size = E // cfg.num_groups
            gscore = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:k // cfg.group_topk])
                      for g in range(cfg.num_groups)]
            best = sorted(range(cfg.num_groups), key=lambda g: -gscore[g])[:cfg.group_topk]
            allowed = [e for e in range(E) if e // size in best]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
        if cfg.score_function == "softmax" and cfg.pre_softmax:
            gates = {e: soft[e] for e in chosen}
        elif cfg.score_function == "softmax":
            z = sum(math.exp(lt[e] - lt[chosen[0]]) for e in chosen)
            gates = {e: math.exp(lt[e] - lt[chosen[0]]) / z for e in chosen}
        else:
            total = sum(sig[e] for e in chosen) if k > 1 else 1.0
            gates = {e: sig[e] / total for e in chosen}
        routed.append({e: g * (cfg.topk_scaling_factor or 1.0) for e, g in gates.items()})
    if cfg.drop_tokens:  # each expert keeps its `capacity` highest weights
        capacity = math.ceil(T * k / E * cfg.train_capacity_factor)
        for e in range(E):
            users = sorted((t for t in range(T) if e in routed[t]), key=lambda t: -routed[t][e])
            for t in users[capacity:]:
                del routed[t][e]
    # load-balancing loss: E · Σ_e mean score_e · (choices to e / (k · tokens)), over the batch or each sequence
    def balance(rows):
        scores = []
        for lt in (logits[t] for t in rows):
            if cfg.score_function == "softmax":
                m = max(lt)
                s = [math.exp(v - m) for v in lt]
            else:
                s = [1 / (1 + math.exp(-v)) for v in lt]
            scores.append([v / sum(s) for v in s])
        counts = [0] * E
        for s in scores:
            for e in sorted(range(E), key=lambda e: -s[e])[:k]:
                counts[e] += 1
        n = len(rows)
        return E * sum(sum(s[e] for s in scores) / n * counts[e] / (k * n) for e in range(E))
    lb = cfg.load_balancing_type
    if lb == "none":
        aux = 0.0
    elif lb == "seq_aux_loss":
        S = T // num_sequences
        aux = sum(balance(range(b * S, (b + 1) * S)) for b in range(num_sequences)) / num_sequences
    else:  # aux_loss; global_aux_loss on one rank and one micro-batch is the same
        aux = balance(range(T))
    zl = sum((max(lt) + math.log(sum(math.exp(v - max(lt)) for v in lt))) ** 2 for lt in logits) / T
    return routed, aux, zl


SCORES = [("softmax", True, False), ("softmax", False, False), ("sigmoid", False, False), ("sigmoid", False, True)]


def cases():
    for i, ((score, pre, bias), k, grouped, lb, cf) in enumerate(itertools.product(
            SCORES, (1, 2, 4), (False, True), ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"), (None, 0.75))):
        scaling = 2.0 if i % 2 else None
        if score == "softmax" and k == 1 and not pre:
            continue
        groups = (4, 1 if k == 1 else 2) if grouped else (None, None)
        yield dict(score_function=score, pre_softmax=pre, expert_bias=bias, topk=k, num_groups=groups[0],
                   group_topk=groups[1], topk_scaling_factor=scaling, load_balancing_type=lb,
                   drop_tokens=cf is not None, train_capacity_factor=cf or 1.0)


def test_every_option_equals_the_float64_loop():
    gen = torch.Generator().manual_seed(0)
    n = 0
    for fields in cases():
        cfg = MoEConfig(num_experts=E, router_family="megatron", router_dtype="fp64", min_capacity=0,
                        z_loss_coeff=1e-3, **fields)
        router = TopKRouter(cfg, D).double()
        with torch.no_grad():
            router.weight.copy_(torch.randn(E, D, generator=gen))
            if cfg.expert_bias:
                router.expert_bias.copy_(torch.randn(E, generator=gen) * 0.1)
        B, S = 3, 8
        x = torch.randn(B * S, D, generator=gen, dtype=torch.float64)
        r = router(x, num_sequences=B)
        bias = router.expert_bias.tolist() if cfg.expert_bias else None
        want, aux, zl = reference(x, router.weight.detach(), cfg, bias, B)
        got = [dict() for _ in range(B * S)]
        for p in r.pair_idx_N.tolist():
            if p >= B * S * cfg.topk:  # capacity mode: an empty slot of the fixed-size slot table (sentinel P)
                continue
            t, c = divmod(p, cfg.topk)
            got[t][int(r.expert_TK[t, c])] = float(r.gates_TK[t, c].detach())
        # the router computes in fp64 but returns fp32 combine weights and losses: fp32 round-off, 1e-6 relative
        assert [sorted(g) for g in got] == [sorted(w) for w in want], fields
        assert all(abs(g[e] - w[e]) <= 1e-6 * abs(w[e]) for g, w in zip(got, want) for e in w), fields
        assert abs(float(r.aux_loss.detach()) - aux) <= 1e-6 * max(abs(aux), 1e-6), fields
        assert abs(float(r.z_loss.detach()) - zl) <= 1e-6 * zl, fields
        n += 1
    assert n > 150 // 2


def test_expert_bias_update_is_sign_of_load_gap():
    cfg = MoEConfig(num_experts=4, topk=1, router_family="megatron", score_function="sigmoid", expert_bias=True,
                    bias_update_rate=0.5)
    router = TopKRouter(cfg, 2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    router(torch.tensor([[3.0, 0.0], [2.0, 0.1], [0.1, 2.0], [-2.0, 0.0]]))  # loads 2, 1, 1, 0: mean 1
    assert router.local_tokens_per_expert.tolist() == [2.0, 1.0, 1.0, 0.0]
    with torch.no_grad():
        router(torch.zeros(1, 2))  # no gradient: not counted (evaluation, recomputation)
    step_routers(router)
    assert router.expert_bias.tolist() == [-0.5, 0.0, 0.0, 0.5]
    assert router.local_tokens_per_expert.tolist() == [0.0] * 4
    assert "expert_bias" in router.state_dict() and "local_tokens_per_expert" not in router.state_dict()


@pytest.mark.parametrize("fields, match", [
    (dict(num_groups=3, group_topk=1, topk=2), r"--moe-router-num-groups \(3\) must divide --num-experts"),
    (dict(num_groups=4, group_topk=5, topk=2), r"--moe-router-group-topk \(5\) must be between 1 and"),
    (dict(num_groups=4, group_topk=2, topk=3), r"--moe-router-topk \(3\) must be a multiple of --moe-router-group"),
    (dict(num_groups=4, topk=2), r"--moe-router-num-groups \(4\) and --moe-router-group-topk \(None\) go together"),
    (dict(topk=9), r"--moe-router-topk \(9\) must be between 1 and the smallest --num-experts \(8\)"),
    (dict(topk=1), r"--moe-router-topk 1 with --moe-router-score-function softmax needs --moe-router-pre-softmax"),
    (dict(topk=2, expert_bias=True), r"--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
    (dict(topk=2, drop_policy="any"), r"--moe-token-drop-policy \('any'\) must be 'probs' or 'position'"),
    (dict(topk=2, noisy_gate_policy="RSample"), r"--moe-noisy-gate-policy \(RSample\) is DeepSpeed routing"),
    (dict(topk=2, pad_to_capacity=True, drop_tokens=False), r"--moe-pad-expert-input-to-capacity needs"),
    (dict(topk=2, router_dtype="bf16"), r"--moe-router-dtype \('bf16'\) must be one of"),
    (dict(topk=2, input_jitter_eps=1.5), r"--moe-input-jitter-eps \(1.5\) must be in \(0, 1\)"),
])
def test_impossible_combinations_are_one_line(fields, match):
    with pytest.raises(ValueError, match=match) as err:
        MoEConfig(num_experts=8, router_family="megatron", **fields)
    assert "\n" not in str(err.value)


def test_megatron_options_need_the_megatron_family():
    with pytest.raises(ValueError, match=r"--moe-router-enable-expert-bias is a megatron-core router option"):
        MoEConfig(num_experts=8, topk=2, expert_bias=True)


@pytest.mark.parametrize("family", ["deepspeed", "megatron"])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_router_runs_in_its_dtype_under_bf16_autocast(family, dtype):
    """CUDA autocast hands the MoE layer fp32 (its LayerNorm rule); bf16 autocast must not lower the router's GEMM
    (forward or backward), and the combine weights and losses come back fp32."""
    fields = dict(router_family="megatron", score_function="sigmoid") if family == "megatron" else {}
    router = TopKRouter(MoEConfig(num_experts=4, topk=2, router_dtype=dtype, **fields), 8)
    x = torch.randn(16, 8, requires_grad=True)
    with DispatchAudit(record_sites=False) as audit:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = router(x)
        (r.gates_TK.sum() + r.aux_loss).backward()  # outside autocast, as the training step runs it
    want = {"fp32": torch.float32, "fp64": torch.float64}[dtype]
    assert audit.gemms and all(set(g.dtypes) == {want} for g in audit.gemms), audit.gemms
    assert r.gates_TK.dtype == r.aux_loss.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_activation_recompute_counts_once_and_recomputes_the_same_loss():
    """A non-reentrant activation checkpoint reruns the router inside the backward: it must not count the tokens
    again (expert bias, global_aux_loss) and must recompute the same global_aux_loss (else its gradient differs)."""
    def run(recompute):
        cfg = MoEConfig(num_experts=E, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                        load_balancing_type="global_aux_loss")
        router = TopKRouter(cfg, D)
        with torch.no_grad():
            router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(3)))
        for x in torch.randn(2, 12, D, generator=torch.Generator().manual_seed(4)):  # two micro-batches
            def f(x_TD):
                r = router(x_TD)
                return r.aux_loss + r.gates_TK.mean()
            loss = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False) if recompute else f(x)
            loss.backward()
        return router.weight.grad, router.local_tokens_per_expert.clone(), router.ga_steps.clone()

    plain, recomputed = run(False), run(True)
    assert torch.equal(plain[1], recomputed[1]) and plain[1].sum() == 2 * 12 * 2
    assert float(recomputed[2]) == 2.0
    torch.testing.assert_close(recomputed[0], plain[0], rtol=0, atol=0)  # same ops on the same values: exact


def test_casting_the_model_keeps_the_router_buffers_fp32():
    cfg = MoEConfig(num_experts=4, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                    load_balancing_type="global_aux_loss")
    router = TopKRouter(cfg, 8)
    router.expert_bias.fill_(0.0123)
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert all(getattr(router, n).dtype == torch.float32 for n in TopKRouter._FP32_BUFFERS)
    assert router.expert_bias[0].item() == torch.tensor(0.0123).item()  # not rounded through bf16
    assert set(dict(router.named_buffers())) == set(TopKRouter._FP32_BUFFERS)
    r = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert r.gates_TK.dtype == torch.float32


def test_proportional_expert_bias_update_against_a_loop():
    """--moe-router-bias-update-type proportional (issue 28): bias_e += rate * (mean - load_e) / mean, checked
    against a float64 loop over experts on random routing; the default 'sign' step is unchanged."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    for kind in ("proportional", "sign"):
        cfg = MoEConfig(num_experts=8, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                        bias_update_rate=0.05, bias_update_type=kind)
        router = TopKRouter(cfg, 8)
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
        before = router.expert_bias.tolist()
        router(x)
        loads = router.local_tokens_per_expert.tolist()
        assert sum(loads) == 64 * 2 and len(set(loads)) > 2  # uneven: the two rules differ
        step_routers(router)
        mean = sum(loads) / len(loads)
        for e, (b, c) in enumerate(zip(before, loads)):
            gap = mean - c
            step = gap / mean if kind == "proportional" else (gap > 0) - (gap < 0)
            # fp32 buffer: one rounding of b + step, 1e-6 absolute for |values| < 0.3
            assert abs(router.expert_bias[e].item() - (b + 0.05 * step)) <= 1e-6, (kind, e)
