"""megatron/grad_sync.py without a training loop: which parameters are averaged how, and the norm groups.

One process with a ParallelGroups that says DP = 4 (groups None: nothing to communicate) isolates the rule
itself: dense grads are divided by DP, expert grads by DP too (not by the expert-DP size DP / EP), per EP size.
tests/dist/test_moe_ep.py checks the same rule end to end over real gloo groups."""
import torch

from megatron.grad_sync import norm_groups, reduce_gradients, split_params
from megatron.parallel_state import ParallelGroups
from moe import MoEConfig, MoELayer


def _model():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, MoEConfig(num_experts=(4,), ep_size=(1,)))
    for p in layer.parameters():
        p.grad = torch.full_like(p, 12.0)
    return layer


def test_dense_and_expert_grads_divided_by_dp_size_per_ep_group():
    layer = _model()
    for p in layer.experts.parameters():
        p.ep_size = 2  # EP = 2: the expert-DP group has DP / 2 = 2 ranks, yet the divisor is DP = 4
    split = split_params(layer)
    assert {id(p) for p in split.expert} == {id(p) for p in layer.experts.parameters()}
    assert {id(p) for p in split.dense} == {id(p) for p in layer.router.parameters()}
    groups = ParallelGroups(world_size=4, rank=0, tp_size=1, dp_size=4, tp_group=None, dp_group=None,
                            ep_groups={2: None}, expert_dp_groups={2: None})
    reduce_gradients(split, groups)
    for p in layer.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 3.0)), "every grad divided by DP = 4"


def test_norm_groups_put_each_ep_size_with_its_group():
    layer = _model()
    for p in layer.experts.parameters():
        p.ep_size = 2  # as MoELayer tags them under EP = 2
    split = split_params(layer)
    marker = object()
    groups = ParallelGroups(world_size=4, rank=0, tp_size=1, dp_size=4, tp_group=None, dp_group=None,
                            ep_groups={2: marker}, expert_dp_groups={2: None})
    got = norm_groups(split, groups)
    assert got[0] == ([], None)  # no tensor-parallel shards
    assert [id(p) for p in got[1][0]] == [id(p) for p in split.expert] and got[1][1] is marker
    single = ParallelGroups(world_size=1, rank=0, tp_size=1, dp_size=1, tp_group=None, dp_group=None,
                            ep_groups={2: marker}, expert_dp_groups={2: None})
    assert norm_groups(split, single)[1][1] is None  # one rank: no reduction
