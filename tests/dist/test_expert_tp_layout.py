"""The folded expert grid (Megatron-LM's MoE parallel folding, issue 27): its rank order, the groups
parallel_state.initialize builds on 4 gloo ranks, when it is used, and the one-line errors of combinations that do
not fit (every flag involved named)."""
import pytest
import torch.distributed as dist

from megatron import parallel_state
from megatron.arguments import parse_args, train_config_from_args, validate
from megatron.errors import ConfigError
from moe import MoE, MoEConfig, MoELayer
from tests.dist.launcher import run_distributed


def test_expert_grid_rank_order():
    """Stage rank s = tp + TP (cp + CP dp) = etp + ETP (ep + EP edp); rank = s + S pp. World 16 = TP 2 x CP 1 x
    DP 4 x PP 2 with ETP 2, EP 2: EDP 2 per stage."""
    layout = parallel_state.RankLayout(tp=2, cp=1, dp=4, pp=2)
    grid = parallel_state.expert_layout(layout, ep_size=2, etp_size=2)
    assert (grid.etp, grid.ep, grid.edp, grid.pp) == (2, 2, 2, 2)
    assert grid.coords(13) == {"etp": 1, "ep": 0, "edp": 1, "pp": 1}
    assert grid.groups(("etp",))[:3] == [[0, 1], [2, 3], [4, 5]]  # ETP = the TP pairs here
    assert grid.groups(("ep",))[:3] == [[0, 2], [1, 3], [4, 6]]  # EP strides ETP, inside a stage
    assert grid.groups(("edp",))[:2] == [[0, 4], [1, 5]]
    assert grid.groups(("etp", "ep"))[0] == [0, 1, 2, 3]
    for vary in (("etp",), ("ep",), ("edp",)):  # each family partitions the world, never crossing a stage
        groups = grid.groups(vary)
        assert sorted(r for g in groups for r in g) == list(range(16))
        assert all(len({r // 8 for r in g}) == 1 for g in groups)
    # EP folded over TP: TP 2, DP 1, EP 2, ETP 1: the EP group is the TP pair
    assert parallel_state.expert_layout(parallel_state.RankLayout(2, 1, 1, 1), 2, 1).groups(("ep",)) == [[0, 1]]


def test_replicated_experts_expert_dp_spans_tp():
    """Without the grid, TP ranks still dispatch disjoint token slices (no SP): expert-DP spans the TP ranks."""
    layout = parallel_state.RankLayout(tp=2, cp=1, dp=2, pp=1)
    assert parallel_state._expert_rank_lists(layout, 1, span_tp=True) == ([[0], [2], [1], [3]], [[0, 1, 2, 3]])
    assert parallel_state._expert_rank_lists(layout, 2, span_tp=True) == ([[0, 2], [1, 3]], [[0, 1], [2, 3]])
    assert parallel_state._expert_rank_lists(layout, 2) == ([[0, 2], [1, 3]], [[0], [2], [1], [3]])


def test_when_the_grid_is_used():
    assert not parallel_state.expert_folded(2, 1, 4, (2,), 1)  # EP divides DP, ETP 1: experts replicated over TP
    assert parallel_state.expert_folded(2, 1, 4, (2,), 2)  # ETP > 1
    assert parallel_state.expert_folded(2, 1, 1, (2,), 1)  # EP 2 does not divide DP 1: folded over TP
    assert parallel_state.validate_sizes(4, 2, (4,), etp_size=1) == 2  # EP 4 over TP 2 x DP 2


def _groups_worker(rank, world):
    g = parallel_state.initialize(2, (2,), etp_size=2)  # TP 2 x DP 2; ETP 2 x EP 2 x EDP 1
    ranks = dist.get_process_group_ranks
    g2 = parallel_state.initialize(1, (2,), etp_size=2)  # DP 4; ETP 2 x EP 2 x EDP 1: ETP and EP over DP ranks
    g3 = parallel_state.initialize(2, (2,), sequence_parallel=True)  # not folded: the replicated layout
    return {"etp": ranks(g.etp_group(2)), "ep": ranks(g.ep_group(2)), "emp": ranks(g.expert_norm_group(2)),
            "edp": ranks(g.expert_dp_group(2)), "dedup": g.token_dedup_group is not None,
            "dp_etp": ranks(g2.etp_group(2)), "dp_ep": ranks(g2.ep_group(2)), "dp_dedup": g2.token_dedup_group,
            "sp_folded": g3.expert_folded, "sp_ep": ranks(g3.ep_group(2)) if g3.ep_group(2) else None}


@pytest.mark.slow  # a 4-process spawn on the shared cores: ~15 s
def test_groups_built_on_4_ranks():
    out = run_distributed(_groups_worker, 4)
    for rank, r in enumerate(out):
        assert r["etp"] == [rank // 2 * 2, rank // 2 * 2 + 1] and r["emp"] == [0, 1, 2, 3]
        assert r["ep"] == [rank % 2, rank % 2 + 2] and r["edp"] == [rank] and r["dedup"]
        assert r["dp_etp"] == r["etp"] and r["dp_ep"] == r["ep"] and r["dp_dedup"] is None
        assert not r["sp_folded"] and r["sp_ep"] == [rank % 2, rank % 2 + 2]  # EP inside DP at each TP rank


BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--train-iters", "10", "--num-experts", "4", "--global-batch-size", "8"]


def _validate(extra, world, dp=1):
    validate(train_config_from_args(parse_args(BASE + extra), 128, dp_size=dp), world_size=world)


@pytest.mark.parametrize("extra, world, msg", [
    (["--expert-tensor-parallel-size", "2", "--moe-expert-parallel-size", "4"], 4,
     r"--moe-expert-parallel-size \(4\) x --expert-tensor-parallel-size \(2\) = 8 must divide the ranks of a pipeline "
     r"stage: world size \(4\) / --pipeline-model-parallel-size \(1\) = --tensor-model-parallel-size \(1\) x "
     r"--context-parallel-size \(1\) x data-parallel \(4\) = 4"),
    (["--expert-tensor-parallel-size", "3"], 3, r"--moe-ffn-hidden-size \(or --ffn-hidden-size\) \(256\) must be "
                                                 r"divisible by --expert-tensor-parallel-size \(3\)"),
    (["--enable-expert-tensor-parallelism", "--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size",
      "4"], 4, r"--enable-expert-tensor-parallelism sets the expert TP size to --tensor-model-parallel-size \(2\), "
               r"but --expert-tensor-parallel-size is 4"),
    (["--expert-tensor-parallel-size", "2", "--num-experts", "1"], 2, r"--expert-tensor-parallel-size \(2\) splits "
                                                                      r"experts, but the model is dense"),
])
def test_bad_combinations_one_line(extra, world, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        _validate(extra, world, dp=world)
    assert "\n" not in str(e.value)


def test_layer_refusals_one_line():
    cfg = MoEConfig(num_experts=4)
    with pytest.raises(ValueError, match=r"--expert-tensor-parallel-size \(2\) must divide the expert FFN width "
                                         r"\(15\)"):
        from moe.experts import GroupedMLPExperts
        GroupedMLPExperts(4, 8, 15, etp_size=2)
    with pytest.raises(ValueError, match="enable_expert_tensor_parallelism=True needs tp_group="):
        MoE(8, num_experts=4, enable_expert_tensor_parallelism=True)
    assert MoELayer(8, 16, 4, cfg).expert_grid is False
