"""The megatron-core router family against megatron-core 0.16.1's own TopKRouter, over a grid of its options.

megatron-core's import name is also `megatron`, so it lives in its own venv (`make setup` builds .venv-mcore, or set
MCORE_PYTHON) and runs in ONE subprocess for the whole grid (tests/peers/mcore_router.py). Compared per case: combine
weights and routing map (the experts chosen and kept), the tracked load-balancing and z losses, the router weight's
gradient through probs + coeff·aux + z_coeff·z, and the expert-bias token counts and update.
"""
import itertools
import os
import subprocess

import pytest
import torch

from moe.config import MoEConfig
from moe.gating import TopKRouter, step_routers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MCORE_PYTHON = os.environ.get("MCORE_PYTHON", os.path.join(ROOT, ".venv-mcore", "bin", "python"))
E, D, AUX_COEFF, Z_COEFF, RATE = 16, 8, 0.01, 1e-3, 1e-3

SCORES = [("softmax", True, False), ("softmax", False, False), ("sigmoid", False, False), ("sigmoid", False, True)]
CAPACITY = [None, (1.0, "probs", False), (0.5, "position", False), (0.5, "probs", True)]


def grid():
    """(score, pre_softmax, expert bias, k, groups, scaling, load balancing, capacity, z-loss, dtype) cases."""
    cases = []
    for i, ((score, pre, bias), k, grouped, scaling, lb, cap) in enumerate(itertools.product(
            SCORES, (1, 2, 8), (False, True), (None, 2.5), ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"),
            CAPACITY)):
        if score == "softmax" and k == 1 and not pre:
            continue  # megatron-core refuses it too (a softmax over one logit)
        if cap is not None and cap[2] and (lb != "aux_loss" or scaling is not None):
            continue  # padding: a few cases suffice (outputs equal the unpadded ones here)
        groups = (4, 1 if k == 1 else 2) if grouped else None
        cases.append(dict(score=score, pre=pre, bias=bias, k=k, groups=groups, scaling=scaling, lb=lb, cap=cap,
                          z=i % 2 == 0, dtype="fp64" if i % 7 == 0 else "fp32",
                          jitter=0.1 if i % 5 == 1 else None))
    return cases


def mcore_config(c):
    cfg = dict(moe_router_topk=c["k"], moe_router_score_function=c["score"], moe_router_pre_softmax=c["pre"],
               moe_router_enable_expert_bias=c["bias"], moe_router_topk_scaling_factor=c["scaling"],
               moe_router_load_balancing_type=c["lb"], moe_aux_loss_coeff=AUX_COEFF,
               moe_z_loss_coeff=Z_COEFF if c["z"] else None, moe_router_dtype=c["dtype"],
               moe_router_bias_update_rate=RATE, moe_input_jitter_eps=c["jitter"])
    if c["groups"]:
        cfg.update(moe_router_num_groups=c["groups"][0], moe_router_group_topk=c["groups"][1])
    if c["cap"]:
        cfg.update(moe_expert_capacity_factor=c["cap"][0], moe_token_drop_policy=c["cap"][1],
                   moe_pad_expert_input_to_capacity=c["cap"][2])
    return cfg


def our_config(c):
    groups = c["groups"] or (None, None)
    return MoEConfig(num_experts=E, topk=c["k"], router_family="megatron", router_dtype=c["dtype"],
                     score_function=c["score"], pre_softmax=c["pre"], expert_bias=c["bias"],
                     bias_update_rate=RATE, topk_scaling_factor=c["scaling"], num_groups=groups[0],
                     group_topk=groups[1], load_balancing_type=c["lb"], loss_coeff=AUX_COEFF,
                     z_loss_coeff=Z_COEFF if c["z"] else 0.0, drop_tokens=c["cap"] is not None,
                     train_capacity_factor=c["cap"][0] if c["cap"] else 1.0, min_capacity=0,
                     drop_policy=c["cap"][1] if c["cap"] else None, pad_to_capacity=bool(c["cap"] and c["cap"][2]),
                     input_jitter_eps=c["jitter"])


def ours(c, inputs):
    """Our router on the case: dense probs [T, E], kept map, chosen map, losses, weight grad, counts, bias."""
    cfg = our_config(c)
    router = TopKRouter(cfg, D)
    with torch.no_grad():
        router.weight.copy_(inputs["weight"])
        if c["bias"]:
            router.expert_bias.copy_(inputs["expert_bias"])
    x_BSD = inputs["x"]
    torch.manual_seed(inputs["seed"])  # the same jitter draws as megatron-core's (torch.distributions.Uniform)
    r = router(x_BSD.reshape(-1, D), num_sequences=x_BSD.shape[0])
    T, K = r.expert_TK.shape
    # capacity mode: pair_idx_N is the fixed-size slot table, empty slots hold the sentinel T*K (dropped here)
    kept_TK = torch.zeros(T * K + 1).scatter(0, r.pair_idx_N, 1.0)[:T * K].view(T, K)
    probs_TE = torch.zeros(T, E, dtype=r.gates_TK.dtype).scatter(1, r.expert_TK, r.gates_TK * kept_TK)
    kept_TE = torch.zeros(T, E).scatter(1, r.expert_TK, kept_TK).bool()
    chosen_TE = torch.zeros(T, E).scatter(1, r.expert_TK, 1.0).bool()
    loss = (probs_TE * inputs["grad"]).sum() + cfg.loss_coeff * r.aux_loss + cfg.z_loss_coeff * r.z_loss
    loss.backward()
    out = dict(probs=probs_TE.detach(), kept=kept_TE, chosen=chosen_TE, aux=float(r.aux_loss.detach()),
               z=float(r.z_loss.detach()), weight_grad=router.weight.grad, capacity=r.capacity)
    if c["bias"]:
        out["tokens"] = router.local_tokens_per_expert.clone()
        step_routers(router)
        out["expert_bias"] = router.expert_bias.clone()
    return out


@pytest.fixture(scope="module")
def mcore_results(tmp_path_factory):
    if not os.path.exists(MCORE_PYTHON):
        pytest.skip(f"megatron-core venv missing ({MCORE_PYTHON}): run `make setup` online (it builds .venv-mcore "
                    f"with megatron-core==0.16.1) or set MCORE_PYTHON")
    cases, gen = grid(), torch.Generator().manual_seed(0)
    inputs = []
    for c in cases:
        # capacity and jitter cases: one sequence, so megatron-core's [S, B] token order (drop order, jitter draws)
        # is ours
        b, s = (1, 32) if c["cap"] or c["jitter"] else (2, 16)
        inputs.append(dict(weight=torch.randn(E, D, generator=gen), x=torch.randn(b, s, D, generator=gen),
                           seed=len(inputs),
                           expert_bias=torch.randn(E, generator=gen) * 0.05 if c["bias"] else None,
                           grad=torch.randn(b * s, E, generator=gen)))
    tmp = tmp_path_factory.mktemp("mcore")
    torch.save([dict(config=mcore_config(c), bias_update_rate=RATE, **i) for c, i in zip(cases, inputs)],
               tmp / "cases.pt")
    proc = subprocess.run([MCORE_PYTHON, os.path.join(ROOT, "tests", "peers", "mcore_router.py"),
                           str(tmp / "cases.pt"), str(tmp / "results.pt")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, inputs, torch.load(tmp / "results.pt", weights_only=False)


def test_grid_covers_the_options():
    cases = grid()
    assert len(cases) > 300
    for key in ("score", "pre", "bias", "k", "groups", "scaling", "lb", "cap", "z", "dtype", "jitter"):
        assert len({str(c[key]) for c in cases}) > 1, key


def test_router_equals_megatron_core(mcore_results):
    cases, inputs, results = mcore_results
    failures = []
    for c, i, m in zip(cases, inputs, results):
        o = ours(c, i)
        # fp32: the same ops in the same order, so probs agree to round-off of the few reductions whose order may
        # differ (softmax over E, the sigmoid renormalisation): 1e-6. fp64 cases: megatron-core takes its softmax and
        # sigmoid in fp32 and casts back, ours stays in fp64: fp32 round-off, 1e-6 relative.
        tol = dict(rtol=1e-6, atol=1e-7)
        mcore_map = m["routing_map"]
        if c["cap"] and c["cap"][2]:  # padded: megatron-core adds unrouted tokens (weight 0) up to capacity
            assert bool((mcore_map.sum(0) == min(o["capacity"], mcore_map.shape[0])).all())
            mcore_map = mcore_map & o["chosen"]
        checks = [("routing map", torch.equal(o["kept"], mcore_map)),
                  ("probs", torch.allclose(o["probs"].double(), m["probs"].double(), **tol))]
        lb = c["lb"]
        if lb != "none":
            # the loss is a sum of T·E products, summed in another order: 1e-5 relative (fp32)
            checks.append(("aux loss", abs(o["aux"] - m["losses"][lb]) <= 1e-5 * abs(m["losses"][lb]) + 1e-7))
        if c["z"]:
            checks.append(("z loss", abs(o["z"] - m["losses"]["z_loss"]) <= 1e-5 * abs(m["losses"]["z_loss"])))
        # gradients through gathers/scatters and the losses, accumulated in another order: 1e-4 relative, 1e-6 abs
        checks.append(("weight grad", torch.allclose(o["weight_grad"], m["weight_grad"], rtol=1e-4, atol=1e-6)))
        if c["bias"]:
            # megatron-core counts its padding rows as load (its map after padding); ours counts routed tokens kept
            counts = mcore_map.sum(0).float() if c["cap"] and c["cap"][2] else m["tokens"]
            checks.append(("token counts", torch.equal(o["tokens"], counts)))
            if not (c["cap"] and c["cap"][2]):
                checks.append(("expert bias", torch.allclose(o["expert_bias"], m["expert_bias"], rtol=0,
                                                             atol=1e-7)))
        failures += [f"{name}: {c}" for name, ok in checks if not ok]
    assert not failures, f"{len(failures)} mismatches, first: " + "\n".join(failures[:8])
