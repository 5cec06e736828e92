"""ParallelGroups on one process: groups of the sizes built, a clear error for any other size."""
import pytest

from megatron import parallel_state


def test_groups_of_sizes_never_built_are_an_error():
    groups = parallel_state.initialize(1, (1,))
    assert groups.ep_group(1) is None and groups.expert_dp_group(1) is None  # one process: no communication
    with pytest.raises(ValueError, match=r"--moe-expert-parallel-size 4: no expert-parallel group of that size was "
                                         r"built \(built: \[1\]\)"):
        groups.ep_group(4)
    with pytest.raises(ValueError, match="size 2: no expert-parallel group"):
        groups.expert_dp_group(2)
