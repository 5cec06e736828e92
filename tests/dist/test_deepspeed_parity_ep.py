"""EP=2 on two gloo processes: moe.MoE equals deepspeed.moe.layer.MoE at EP=2 (DeepSpeed's own groups and
all-to-all), rank by rank, with the same weights (each rank's local experts distinct) and RNG state.

Tolerances as in tests/unit/test_deepspeed_parity.py: fp64 outputs and expert gradients 1e-12 relative (summation
order only), l_aux 1e-6 (fp32 in DeepSpeed), counts exact, input and router gradients 1e-6 (DeepSpeed's fp32 gate
backward is a different graph of fp32 ops).
"""
import logging

import pytest
import torch
from torch import nn

from tests.dist.launcher import run_distributed

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -r requirements-test.txt)")

D, FF, E = 8, 16, 4
CASES = [dict(k=1, capacity_factor=1.0, min_capacity=1), dict(k=1, capacity_factor=1.0, min_capacity=1, use_rts=False),
         dict(k=2, capacity_factor=1.0, min_capacity=1), dict(k=1, drop_tokens=False), dict(k=2, drop_tokens=False),
         dict(k=3, capacity_factor=1.25, min_capacity=1), dict(k=2, use_residual=True, min_capacity=1)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _case(rank, kw):
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from moe import MoE

    def expert():
        return nn.Sequential(nn.Linear(D, FF), nn.GELU(approximate="tanh"), nn.Linear(FF, D))

    torch.manual_seed(0)  # the same router (and residual branch) on both ranks
    ds = DeepSpeedMoE(D, expert(), num_experts=E, ep_size=2, **kw).double()
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        for p in ds.parameters():
            p.normal_(0, 0.5)
        torch.manual_seed(100 + rank)  # distinct local experts per rank
        for p in ds.deepspeed_moe.experts.parameters():
            p.normal_(0, 0.5)
    ours = MoE(D, None, num_experts=E, ep_size=2, ffn_hidden_size=FF, **kw).double()
    ours.load_deepspeed_state_dict(ds.state_dict())
    gen = torch.Generator().manual_seed(10 + rank)  # different tokens per rank, the same count (DeepSpeed needs it)
    x, dy = torch.randn(2, 12, D, generator=gen, dtype=torch.float64), torch.randn(2, 12, D, generator=gen,
                                                                                   dtype=torch.float64)
    results = []
    for layer in (ds, ours):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        out, l_aux, counts = layer(xi)
        ((out * dy).sum() + l_aux).backward()
        results.append((out.detach(), l_aux.detach(), counts, xi.grad))
    (o1, a1, c1, g1), (o2, a2, c2, g2) = results
    errs = {"out": _rel(o2, o1), "l_aux": _rel(a2, a1), "x_grad": _rel(g2, g1),
            "counts_equal": float(not torch.equal(c1, c2)),
            "router_grad": _rel(ours.moe.router.weight.grad, ds.deepspeed_moe.gate.wg.weight.grad)}
    ex = ours.moe.experts
    for i, e in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        mine = (ex.w1_eFD.grad[i], ex.b1_eF.grad[i], ex.w2_eDF.grad[i], ex.b2_eD.grad[i])
        errs[f"expert{i}_grad"] = max(_rel(m, p.grad) for m, p in zip(mine, e.parameters()))
    dropped = float((c1.sum() - (o1.abs().sum(-1) > 0).sum()).item())  # >0 shows some case really dropped
    return errs, dropped


def _all(rank, world_size):
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the launcher's process group
    return [_case(rank, kw) for kw in CASES]


pytestmark = pytest.mark.slow  # two processes importing DeepSpeed: ~1.5 min of CPU; `make test-all` runs it


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all, 2)


@pytest.mark.parametrize("case", range(len(CASES)), ids=["top1", "top1-no-rts", "top2", "top1-dropless",
                                                         "top2-dropless", "top3", "top2-residual"])
def test_ep2_equals_deepspeed_ep2(results, case):
    for rank, rank_results in enumerate(results):
        errs, _ = rank_results[case]
        for name, err in errs.items():
            tol = 1e-6 if name in ("l_aux", "x_grad", "router_grad") else (0.0 if name == "counts_equal" else 1e-12)
            assert err <= tol, f"rank {rank} {CASES[case]}: {name} differs by {err}"
    if CASES[case]["k"] == 1 and CASES[case].get("drop_tokens", True):
        assert sum(r[case][1] for r in results) > 0, "the capacity should drop some tokens in this case"
