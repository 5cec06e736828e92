"""ParallelGroups on one process: groups of the sizes built, a clear error for any other size."""
import pytest

from megatron import parallel_state
from megatron.errors import ConfigError


def test_groups_of_sizes_never_built_are_an_error():
    groups = parallel_state.initialize(1, (1,))
    assert groups.ep_group(1) is None and groups.expert_dp_group(1) is None  # one process: no communication
    with pytest.raises(ValueError, match=r"--moe-expert-parallel-size 4: no expert-parallel group of that size was "
                                         r"built \(built: \[1\]\)"):
        groups.ep_group(4)
    with pytest.raises(ValueError, match="size 2: no expert-parallel group"):
        groups.expert_dp_group(2)


def test_rank_layout_matches_megatron_lm_docstring():
    """Megatron-LM's initialize_model_parallel docstring: 16 GPUs, TP 2, PP 4 (so DP 2): TP groups [0,1],[2,3],..
    DP groups [0,2],[1,3],[4,6],..; PP groups [0,4,8,12],[1,5,9,13],.. (CP 1)."""
    layout = parallel_state.RankLayout(tp=2, cp=1, dp=2, pp=4)
    assert layout.groups(("tp",)) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert layout.groups(("dp",))[:3] == [[0, 2], [1, 3], [4, 6]]
    assert layout.groups(("pp",)) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


def test_rank_layout_tp_fastest_then_cp_dp_pp():
    layout = parallel_state.RankLayout(tp=2, cp=2, dp=2, pp=2)
    assert [layout.coords(r) for r in (0, 1, 2, 4, 8, 15)] == [
        dict(tp=0, cp=0, dp=0, pp=0), dict(tp=1, cp=0, dp=0, pp=0), dict(tp=0, cp=1, dp=0, pp=0),
        dict(tp=0, cp=0, dp=1, pp=0), dict(tp=0, cp=0, dp=0, pp=1), dict(tp=1, cp=1, dp=1, pp=1)]
    assert all(layout.rank(**layout.coords(r)) == r for r in range(16))
    assert layout.groups(("cp",))[:2] == [[0, 2], [1, 3]]
    assert layout.groups(("dp",))[:2] == [[0, 4], [1, 5]]
    assert layout.groups(("cp", "dp"))[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.groups(("pp",))[0] == [0, 8]
    for vary in (("tp",), ("cp",), ("dp",), ("pp",)):  # each family partitions the world
        assert sorted(r for g in layout.groups(vary) for r in g) == list(range(16))


def test_expert_groups_live_inside_dp_groups():
    layout = parallel_state.RankLayout(tp=2, cp=1, dp=4, pp=1)
    ep, edp = parallel_state._expert_rank_lists(layout, 2)
    assert ep == [[0, 2], [4, 6], [1, 3], [5, 7]] and edp == [[0, 4], [2, 6], [1, 5], [3, 7]]


@pytest.mark.parametrize("kw, msg", [
    (dict(world_size=12, tp_size=2, ep_sizes=(1,), cp_size=2, pp_size=2),
     r"world size \(12\) must be divisible by --tensor-model-parallel-size \(2\) x --context-parallel-size \(2\) x "
     r"--pipeline-model-parallel-size \(2\) = 8"),
    (dict(world_size=16, tp_size=2, ep_sizes=(4,), cp_size=2, pp_size=2, etp_size=4),
     r"--moe-expert-parallel-size \(4\) x --expert-tensor-parallel-size \(4\) = 16 must divide the ranks of a "
     r"pipeline stage: world size \(16\) / --pipeline-model-parallel-size \(2\) = --tensor-model-parallel-size "
     r"\(2\) x --context-parallel-size \(2\) x data-parallel \(2\) = 8"),
    (dict(world_size=4, tp_size=1, ep_sizes=(4,), etp_size=2), r"--expert-tensor-parallel-size \(2\) = 8 must"),
])
def test_sizes_validated_in_one_line_naming_every_factor(kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parallel_state.validate_sizes(**kw)
    assert "\n" not in str(e.value)
    assert parallel_state.validate_sizes(16, 2, (2,), cp_size=2, pp_size=2) == 2
