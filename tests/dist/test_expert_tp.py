"""Expert tensor parallelism and the folded expert grid on gloo: the MoE layer with each expert's FFN split over
2 ETP ranks, with tokens de-duplicated over TP, and with EP folded over TP, equals the ETP = 1 layer on one process
(outputs, aux loss, load statistics, input / router / expert gradients, the expert shards merged back)."""
import pytest
import torch
import torch.distributed as dist

from moe import MoEConfig, MoELayer
from moe.experts import etp_merge, etp_shard
from tests.dist.launcher import run_distributed_jobs

D, FF, E, T = 8, 16, 4, 10  # F = 16: each ETP=2 shard (8 columns, 16 gated rows) suits torch._grouped_mm

ROUTERS = {
    "deepspeed_top2_capacity": dict(topk=2, train_capacity_factor=1.0, min_capacity=1, second_expert_sampling=False),
    "deepspeed_top1_dropless": dict(topk=1, drop_tokens=False, use_rts=False),
    "sigmoid_bias_top2": dict(topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                              drop_tokens=False, load_balancing_type="aux_loss", topk_scaling_factor=2.0),
}


def _subgroups(world, size, stride):
    """Groups of `size` ranks at `stride` (collective: every rank creates all); returns this rank's."""
    rank, mine = dist.get_rank(), None
    starts = [s for s in range(world) if (s // stride) % size == 0]
    for s in starts:
        ranks = [s + i * stride for i in range(size)]
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


def _reference(router, activation, seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, ep_size=1, **ROUTERS[router])
    ref = MoELayer(D, FF, E, cfg, activation=activation)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in (ref.experts.b1_eF, ref.experts.b2_eD):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        ref.router.weight.copy_(torch.randn(ref.router.weight.shape, generator=g))
    return cfg, ref


def _copy_shards(layer, ref, ep_rank, etp_rank, etp_size, gated):
    e = layer.num_local_experts
    with torch.no_grad():
        layer.router.weight.copy_(ref.router.weight)
        for name, dim in (("w1_eFD", 1), ("b1_eF", 1), ("w2_eDF", 2), ("b2_eD", 1)):
            full = getattr(ref.experts, name)[ep_rank * e:(ep_rank + 1) * e]
            two = gated and name in ("w1_eFD", "b1_eF")
            getattr(layer.experts, name).copy_(etp_shard(full, dim, etp_size, etp_rank, two))


def _merged_grads(layer, ep_group, etp_group):
    """Every expert parameter's gradient gathered over ETP (merged) and EP (stacked): the ETP = 1 layout."""
    out = {}
    gated = layer.experts.activation == "swiglu"
    for name, dim in (("w1_eFD", 1), ("b1_eF", 1), ("w2_eDF", 2), ("b2_eD", 1)):
        g = getattr(layer.experts, name).grad
        for group, merge in ((etp_group, True), (ep_group, False)):
            if group is None:
                continue
            parts = [torch.empty_like(g) for _ in range(group.size())]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = etp_merge(parts, dim, gated and name in ("w1_eFD", "b1_eF")) if merge else torch.cat(parts)
        out[name] = g
    return out


def _worker(rank, world, router, activation, tp, etp, ep, grouped_mm="off"):
    """Attention grid TP x DP (TP fastest), expert grid ETP x EP x EDP (ETP fastest) over the same ranks. TP ranks
    hold the same tokens (de-duplicated by the layer); DP ranks other tokens. Returns the max abs errors."""
    torch.manual_seed(0)
    cfg, ref = _reference(router, activation)
    tp_group = _subgroups(world, tp, 1) if tp > 1 else None
    etp_group = _subgroups(world, etp, 1) if etp > 1 else None
    ep_group = _subgroups(world, ep, etp) if ep > 1 else None
    layer = MoELayer(D, FF, E, MoEConfig(num_experts=E, ep_size=ep, **ROUTERS[router]), ep_group=ep_group,
                     activation=activation, etp_group=etp_group, dedup_group=tp_group, grouped_mm=grouped_mm)
    ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
    etp_rank = 0 if etp_group is None else dist.get_rank(etp_group)
    _copy_shards(layer, ref, ep_rank, etp_rank, etp, activation == "swiglu")
    dp = world // tp
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(T, D, generator=g) for _ in range(dp)]
    ts = [torch.randn(T, D, generator=g) for _ in range(dp)]
    mine = rank // tp  # this rank's DP index: TP ranks share the tokens

    with torch.no_grad():  # the inference path (per-expert rows, GroupedMLPExperts.forward under no_grad)
        y_inf = layer(xs[mine])[0]
        ref_inf = ref(xs[mine])[0]
    x = xs[mine].clone().requires_grad_(True)
    y, stats = layer(x)
    loss = ((y - ts[mine]) ** 2).sum(-1).mean() + 0.1 * stats.aux_loss
    loss.backward()

    ref_loss, ref_out = 0.0, None
    ref_x = [xi.clone().requires_grad_(True) for xi in xs]
    for i, (xi, ti) in enumerate(zip(ref_x, ts)):
        yi, si = ref(xi)
        ref_loss = ref_loss + ((yi - ti) ** 2).sum(-1).mean() + 0.1 * si.aux_loss
        if i == mine:
            ref_out = (yi.detach(), si)
    ref_loss.backward()
    errs = {"y": (y - ref_out[0]).abs().max().item(), "y_no_grad": (y_inf - ref_inf).abs().max().item(),
            "aux": (stats.aux_loss - ref_out[1].aux_loss).abs().item(),
            "tokens_per_expert": (stats.tokens_per_expert - ref_out[1].tokens_per_expert).abs().max().item(),
            "dx": (x.grad - ref_x[mine].grad).abs().max().item()}
    # router: identical on TP ranks (full gradient each); summed over DP = the reference's
    rg = layer.router.weight.grad.clone()
    dist.all_reduce(rg)
    rg /= tp
    errs["router"] = (rg - ref.router.weight.grad).abs().max().item()
    # experts: each shard's gradient covers the tokens of its expert-DP replicas: summed over them
    grads = _merged_grads(layer, ep_group, etp_group)
    for name, gm in grads.items():  # equal on the ETP x EP ranks of one replica: the world sum counts each ETP x EP
        dist.all_reduce(gm)
        gm /= etp * ep
        errs[name] = (gm - getattr(ref.experts, name).grad).abs().max().item()
    return errs


def _deepspeed_worker(rank, world):
    """The DeepSpeed drop-in with enable_expert_tensor_parallelism=True over a TP pair (the same tokens on both
    ranks) against the drop-in without it, from the same seed: output, l_aux, exp_counts, input gradient."""
    from moe import MoE
    out = []
    for etp in (False, True):
        torch.manual_seed(0)
        layer = MoE(D, num_experts=E, k=1, ffn_hidden_size=FF, min_capacity=1,
                    enable_expert_tensor_parallelism=etp, tp_group=dist.group.WORLD if etp else None)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        torch.manual_seed(1)  # the same RTS draws
        y, l_aux, counts = layer(x)
        y.square().sum().backward()
        out.append((y.detach(), l_aux.detach(), counts, x.grad))
    return {"y": (out[0][0] - out[1][0]).abs().max().item(), "aux": (out[0][1] - out[1][1]).abs().item(),
            "counts": (out[0][2] - out[1][2]).abs().max().item(), "dx": (out[0][3] - out[1][3]).abs().max().item()}


def _one_token_worker(rank, world):
    """One token over a TP pair (generation's decode step at micro-batch 1): rank 1's slice is empty; with and
    without ETP, the output and the input gradient still equal the ETP = 1 layer's."""
    errs = {}
    for etp in (False, True):
        cfg, ref = _reference("deepspeed_top2_capacity", "swiglu")
        layer = MoELayer(D, FF, E, cfg, activation="swiglu", dedup_group=dist.group.WORLD,
                         etp_group=dist.group.WORLD if etp else None)
        _copy_shards(layer, ref, 0, rank if etp else 0, 2 if etp else 1, True)
        x = torch.randn(1, D, generator=torch.Generator().manual_seed(4))
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        for lay, xi in ((layer, xs[0]), (ref, xs[1])):
            lay(xi)[0].square().sum().backward()
        with torch.no_grad():
            errs[f"y{int(etp)}"] = (layer(x)[0] - ref(x)[0]).abs().max().item()
        errs[f"dx{int(etp)}"] = (xs[0].grad - xs[1].grad).abs().max().item()
    return errs


# (router, activation, TP, ETP, EP) on 2 ranks, then 4 ranks
CASES_2 = [(r, a, 2, 2, 1) for r in ROUTERS for a in ("swiglu", "gelu_tanh")]
CASES_2 += [("deepspeed_top2_capacity", a, 2, 2, 1, "on") for a in ("swiglu", "gelu_tanh")]  # torch._grouped_mm
CASES_2 += [("deepspeed_top2_capacity", "swiglu", 2, 1, 2),  # EP folded over TP (EP 2 with DP 1), ETP 1
            ("sigmoid_bias_top2", "gelu_tanh", 1, 2, 1)]  # ETP over DP ranks (distinct tokens, no de-dup)
CASES_4 = [("deepspeed_top2_capacity", "swiglu", 2, 2, 2), ("sigmoid_bias_top2", "gelu_tanh", 2, 2, 1),
           ("deepspeed_top1_dropless", "swiglu", 2, 1, 2), ("deepspeed_top2_capacity", "gelu_tanh", 1, 2, 2)]
# fp32 throughout; the parallel layer sums the ETP partials and the TP slices in another order than the reference:
# a few ulps of the O(1) values. 2e-5 absolute covers it with room; a wrong shard or a missing sum is O(0.1).
TOL = 2e-5


@pytest.fixture(scope="module")
def results_2():
    from tests.dist.test_expert_tp_audit import _worker as audit
    return run_distributed_jobs([(_worker, c) for c in CASES_2] + [(_deepspeed_worker, ()), (audit, ()),
                                                                   (_one_token_worker, ())], world_size=2)


@pytest.fixture(scope="module")
def results_4():
    return run_distributed_jobs([(_worker, c) for c in CASES_4], world_size=4)


def _ids(cases):
    return [f"{c[0]}-{c[1]}-tp{c[2]}-etp{c[3]}-ep{c[4]}" + ("-grouped_mm" if len(c) > 5 else "") for c in cases]


@pytest.mark.parametrize("i", range(len(CASES_2)), ids=_ids(CASES_2))
def test_etp_equals_etp1_on_2_ranks(results_2, i):
    for errs in results_2[i]:  # [job][rank]
        assert max(errs.values()) < TOL, errs


def test_deepspeed_dropin_expert_tensor_parallelism(results_2):
    for errs in results_2[len(CASES_2)]:
        assert max(errs.values()) < TOL, errs


def test_folded_path_bf16_and_one_sync(results_2):
    """tests/dist/test_expert_tp_audit.py's audit, run in this module's spawn."""
    from tests.dist.test_expert_tp_audit import check
    check(results_2[len(CASES_2) + 1])


def test_one_token_leaves_a_tp_rank_empty(results_2):
    for errs in results_2[len(CASES_2) + 2]:
        assert max(errs.values()) < TOL, errs


@pytest.mark.slow  # four processes on the shared cores: ~20 s
@pytest.mark.parametrize("i", range(len(CASES_4)), ids=_ids(CASES_4))
def test_etp_with_ep_on_4_ranks(results_4, i):
    for errs in results_4[i]:
        assert max(errs.values()) < TOL, errs
