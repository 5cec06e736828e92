"""Activation recomputation under tensor parallelism (attention dropout from the per-rank TP tracker, whose state
the recompute must replay) and expert parallelism (the recomputed router must choose the same experts, so the
recomputed all-to-alls have the same splits and are matched on every EP rank): losses and every gradient equal
the same model without recomputation, two passes each, dropout on, on two gloo processes."""
import dataclasses

import pytest
import torch

from megatron import parallel_state
from moe.config import MoEConfig
from tests.dist.launcher import run_distributed_jobs
from tests.unit.test_recompute import BASE, RECOMPUTE


def _passes(rank, model, steps=2):
    g = torch.Generator().manual_seed(3 + rank)  # different tokens per rank (EP ranks exchange different rows)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, 96, (2, 16), generator=g)
        model.zero_grad(set_to_none=True)
        o = model(tokens, tokens)
        loss = o.loss.mean() + 0.01 * sum((s.aux_loss for s in o.moe_stats), torch.zeros(()))
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return out


def _compare(rank, world_size, tp, ep):
    from megatron.model import GPTModel

    groups = parallel_state.initialize(tp, (ep,))
    moe = (MoEConfig(num_experts=(4,), expert_interval=2, topk=2, ep_size=(ep,), train_capacity_factor=1.0,
                     min_capacity=1, noisy_gate_policy="RSample", use_rts=True) if ep > 1 else
           MoEConfig(num_experts=(4,), expert_interval=2, topk=1, noisy_gate_policy="Jitter"))
    results = {}
    for mode in ("off", "full-uniform-2", "selective"):  # (block: tests/unit/test_recompute.py)
        torch.manual_seed(5)
        model = GPTModel(dataclasses.replace(BASE, **RECOMPUTE[mode]), moe, groups)
        results[mode] = _passes(rank, model)
    mismatches = []
    for mode in results:
        for step, ((l0, g0), (l1, g1)) in enumerate(zip(results["off"], results[mode])):
            if not torch.equal(l0, l1):
                mismatches.append((mode, step, "loss"))
            mismatches += [(mode, step, n) for n in g0 if not torch.equal(g0[n], g1[n])]
    return {"mismatches": mismatches, "n_grads": len(results["off"][0][1])}


LAYOUTS = [(2, 1), (1, 2)]


@pytest.fixture(scope="module")
def compared():
    """Both layouts in one spawn: {(tp, ep): per-rank results}."""
    return dict(zip(LAYOUTS, run_distributed_jobs([(_compare, layout) for layout in LAYOUTS], 2)))


@pytest.mark.parametrize("tp,ep", LAYOUTS, ids=["tp2", "ep2"])
def test_recompute_equals_no_recompute_tp_ep(compared, tp, ep):
    for r in compared[(tp, ep)]:
        # bit for bit, as on one process: the same kernels on the same inputs with the same masks and routes
        assert r["n_grads"] > 10 and r["mismatches"] == []
