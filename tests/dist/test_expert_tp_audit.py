"""The folded expert path under bf16 autocast with fp32 (LayerNorm) input, on 2 gloo ranks (TP = 2, tokens
de-duplicated): with ETP = 2 and with EP = 2 folded over TP, forward + backward of a MoE layer costs the same ONE
host sync as the EP path (dispatch.counts_to_host: the de-duplicated counts and the ETP peers' counts travel in it),
every expert GEMM is bf16, and every all-to-all carries bf16. Run by tests/dist/test_expert_tp.py (one spawn
for both); alone here only as a slow test."""
import pytest
import torch
import torch.distributed as dist

from tests.dist.launcher import run_distributed
from tests.dist.test_moe_ep_audit import audit_bf16_step

D, FF, E = 16, 32, 4


def _worker(rank, world_size):
    return {(mode, drop): _audit(mode, drop) for mode in ("etp", "ep") for drop in (True, False)}


def _audit(mode, drop_tokens):
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    torch.manual_seed(0)
    world = dist.group.WORLD
    ep = 2 if mode == "ep" else 1
    layer = MoELayer(D, FF, E, MoEConfig(num_experts=E, topk=2, ep_size=ep, drop_tokens=drop_tokens),
                     ep_group=world if ep > 1 else None, etp_group=world if mode == "etp" else None,
                     dedup_group=world)
    x = torch.randn(25, D)  # the same tokens on both TP ranks; odd: the slices are 13 and 12 rows
    return audit_bf16_step(layer, x)


def check(per_rank):
    """Asserts on _worker's result of every rank (tests/dist/test_expert_tp.py runs it in its own spawn)."""
    for by_case in per_rank:
        for case, r in by_case.items():
            assert r["sent"] and set(r["sent"]) == {torch.bfloat16}, (case, r)  # rows out and partials back
            assert r["expert"] == {torch.bfloat16}, (case, r)
            assert len(r["syncs"]) == 1 and "counts_to_host" in r["syncs"][0], (case, r["syncs"])


@pytest.mark.slow  # the same audit in tests/dist/test_expert_tp.py's spawn runs in the fast suite
def test_folded_path_bf16_and_one_sync_alone():
    check(run_distributed(_worker, 2))
