"""Expert parallelism on 2 gloo processes equals the single-process layer: outputs, aux loss, gradients."""
import pytest
import torch
import torch.distributed as dist

from moe import MoE, MoEConfig, MoELayer
from tests.dist.launcher import run_distributed_jobs

D, FF, E = 6, 10, 4


def _build(cfg, ep_group, seed=0):
    """Full single-process reference layer and this rank's EP layer holding experts [r*e, (r+1)*e)."""
    torch.manual_seed(seed)
    E = cfg["num_experts"]
    cfg = {"second_expert_sampling": False, **cfg}  # no random 2nd-expert draws: EP and reference draw differently
    ref = MoELayer(D, FF, E, MoEConfig(**{**cfg, "ep_size": 1})).double()
    with torch.no_grad():
        for p in (ref.experts.b1_eF, ref.experts.b2_eD):
            p.normal_(0, 0.1)
        ref.router.weight.normal_(0, 1.0)
    ep_size = ep_group.size()
    ep = MoELayer(D, FF, E, MoEConfig(**{**cfg, "ep_size": ep_size}), ep_group=ep_group).double()
    e, r = E // ep_size, dist.get_rank(ep_group)
    with torch.no_grad():
        ep.router.weight.copy_(ref.router.weight)
        for name, p in ep.experts.named_parameters():
            p.copy_(getattr(ref.experts, name)[r * e:(r + 1) * e])
    return ref, ep


def _shards(world_size, tokens_per_rank, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, D, dtype=torch.float64, generator=g) for t in tokens_per_rank[:world_size]]


def _task_loss(y, target):
    return ((y - target) ** 2).sum(dim=-1).mean()  # mean over local tokens


def _worker(rank, world_size, cfg, tokens_per_rank, aux_coeff):
    """Returns max abs errors of EP vs reference (each rank compares its own pieces)."""
    group = dist.group.WORLD
    ref, ep = _build(cfg, group)
    xs = _shards(world_size, tokens_per_rank)
    targets = _shards(world_size, tokens_per_rank, seed=2)

    # EP: each rank runs its shard; per-rank loss = task loss (mean over local tokens) + coeff * aux.
    x = xs[rank].clone().requires_grad_(True)
    y, stats = ep(x)
    (_task_loss(y, targets[rank]) + aux_coeff * stats.aux_loss).backward()

    # Reference: the same layer on one process, loss = Σ_r loss_r / N (each shard routed on its own, so
    # capacity and aux loss see the same local T as on the EP rank).
    ref_xs = [xi.clone().requires_grad_(True) for xi in xs]
    total, ref_out = 0.0, []
    for xi, ti in zip(ref_xs, targets):
        yi, si = ref(xi)
        ref_out.append((yi.detach(), si))
        total = total + (_task_loss(yi, ti) + aux_coeff * si.aux_loss) / world_size
    total.backward()

    # Scaling the lead applies: expert grads are sums over all EP peers' tokens of d(loss_r) -> divide by
    # N (here expert-DP size 1); dense (router) grads -> all-reduce SUM then divide by N (= DP average).
    e = cfg["num_experts"] // world_size
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    errs = {
        "y": (y.detach() - ref_out[rank][0]).abs().max().item(),
        "aux": (stats.aux_loss.detach() - ref_out[rank][1].aux_loss.detach()).abs().item(),
        "counts": (stats.tokens_per_expert - ref_out[rank][1].tokens_per_expert).abs().max().item(),
        "x_grad": (x.grad / world_size - ref_xs[rank].grad).abs().max().item(),
        "router_grad": (router_grad / world_size - ref.router.weight.grad).abs().max().item(),
    }
    for name, p in ep.experts.named_parameters():
        ref_grad = getattr(ref.experts, name).grad[rank * e:(rank + 1) * e]
        errs[name] = (p.grad / world_size - ref_grad).abs().max().item()
    return errs


def _full_batch_worker(rank, world_size, cfg, tokens_per_rank):
    """Dropless, no aux: Σ_r loss_r / N on EP ranks equals the full-batch loss on one process."""
    group = dist.group.WORLD
    ref, ep = _build(cfg, group)
    xs = _shards(world_size, tokens_per_rank)
    targets = _shards(world_size, tokens_per_rank, seed=2)
    y, _ = ep(xs[rank])
    (_task_loss(y, targets[rank])).backward()
    yf, _ = ref(torch.cat(xs))
    _task_loss(yf, torch.cat(targets)).backward()  # mean over all tokens = mean of the equal-size shard means
    e = cfg["num_experts"] // world_size
    errs = {}
    for name, p in ep.experts.named_parameters():
        errs[name] = (p.grad / world_size - getattr(ref.experts, name).grad[rank * e:(rank + 1) * e]).abs().max().item()
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    errs["router_grad"] = (router_grad / world_size - ref.router.weight.grad).abs().max().item()
    return errs


def _all_cases(rank, world_size, cases):
    """One spawn for every case (process start-up dominates the run time)."""
    out = [_worker(rank, world_size, *case) for case in cases]
    out.append(_full_batch_worker(rank, world_size, dict(num_experts=E, topk=2, drop_tokens=False), (10, 10)))
    out.append(_deepspeed_style_worker(rank))
    return out


def _deepspeed_style_worker(rank):
    """The DeepSpeed-compatible wrapper builds its own EP groups when none is passed."""
    torch.manual_seed(rank)
    layer = MoE(D, num_experts=E, ep_size=2, k=2, ffn_hidden_size=FF)
    x = torch.randn(3, 5, D, requires_grad=True)
    out, l_aux, exp_counts = layer(x)
    (out.sum() + l_aux).backward()
    return {"shape": tuple(out.shape), "routed": int(exp_counts.sum()), "local_experts": layer.moe.num_local_experts,
            "x_grad_finite": bool(torch.isfinite(x.grad).all())}


CASES = [  # (cfg, tokens per rank, aux coeff)
    (dict(num_experts=E, topk=1, drop_tokens=False), (9, 9), 0.01),
    (dict(num_experts=E, topk=2, drop_tokens=False), (7, 13), 0.01),  # ranks with different T: no hang
    (dict(num_experts=E, topk=1, train_capacity_factor=0.75, min_capacity=1, use_rts=False), (16, 16), 0.1),
    (dict(num_experts=E, topk=2, train_capacity_factor=1.0, min_capacity=1, use_rts=False, z_loss_coeff=1e-3),
     (12, 5), 0.1),
    (dict(num_experts=2, topk=1, train_capacity_factor=1.0, min_capacity=1, use_rts=False), (11, 11), 0.1),
]
FULL_BATCH, DEEPSPEED_STYLE = len(CASES), len(CASES) + 1
# float64 end to end: differences are summation order only, so 1e-10 is loose. The router runs in fp32 whatever the
# layer's dtype (as DeepSpeed's gate), so its weight gradient, summed over another split of the tokens, agrees to
# fp32 rounding: 1e-6.
TOL = 1e-10
ROUTER_TOL = 1e-6


def _ep_training_argv(corpus, tmp):
    from tests.conftest import tiny_train_argv

    return tiny_train_argv(corpus, tmp, "--train-iters", "4", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
                           "--num-experts", "4", "--expert-interval", "2", "--topk", "2",
                           "--disable-moe-token-dropping", "--disable-moe-top2-2nd-expert-sampling")


@pytest.fixture(scope="module")
def ep_runs(tiny_corpus, tmp_path_factory):
    """All of this module's 2-rank runs in one spawn: {"cases", "init", "training"} -> per-rank results."""
    argv = _ep_training_argv(tiny_corpus, tmp_path_factory.mktemp("ep_runs"))
    cases, init, training = run_distributed_jobs([(_all_cases, (CASES,)), (_init_experts, ()),
                                                  (_pretrain_weights, (argv + ["--moe-expert-parallel-size", "2"],))],
                                                 2)
    return {"cases": cases, "init": init, "training": training}


@pytest.fixture(scope="module")
def ep_results(ep_runs):
    return ep_runs["cases"]


def _check(per_rank_errs):
    for rank, errs in enumerate(per_rank_errs):
        for name, err in errs.items():
            assert err <= (ROUTER_TOL if name == "router_grad" else TOL), f"rank {rank}: {name} differs by {err}"


@pytest.mark.parametrize("case", range(len(CASES)), ids=["top1-dropless", "top2-dropless-uneven-T",
                                                         "top1-dropping", "top2-dropping-zloss",
                                                         "one-local-expert"])
def test_ep2_equals_single_process(ep_results, case):
    _check([rank_results[case] for rank_results in ep_results])


def test_ep2_grads_equal_full_batch_training(ep_results):
    _check([rank_results[FULL_BATCH] for rank_results in ep_results])


def test_deepspeed_style_wrapper_builds_ep_groups(ep_results):
    for rank_results in ep_results:
        assert rank_results[DEEPSPEED_STYLE] == {"shape": (3, 5, D), "routed": 30, "local_experts": 2,
                                                 "x_grad_finite": True}


def _pretrain_weights(rank, world_size, argv):
    from megatron.training import pretrain

    r = pretrain(argv)
    return {"losses": r["losses"], "weights": {k: v.detach().clone() for k, v in r["state"].model.state_dict().items()}}


def _init_experts(rank, world_size):
    from megatron import parallel_state
    from moe import MoELayer
    from moe.config import MoEConfig

    groups = parallel_state.initialize(1, (2,))
    torch.manual_seed(5)
    layer = MoELayer(8, 16, 4, MoEConfig(num_experts=(4,), ep_size=(2,)), ep_group=groups.ep_group(2))
    after = torch.rand(3)  # the generator state the next module would see
    return {n: p.detach().clone() for n, p in layer.named_parameters()}, after


def test_ep2_init_holds_the_ep1_experts(ep_runs):
    """Each EP rank draws all global experts in order and keeps its own: distinct experts per rank, equal to
    the EP=1 layer's from the same seed, and the generator ends where EP=1 leaves it."""
    from moe import MoELayer
    from moe.config import MoEConfig

    torch.manual_seed(5)
    ref = MoELayer(8, 16, 4, MoEConfig(num_experts=(4,)))
    ref_after = torch.rand(3)
    ranks = ep_runs["init"]
    for name, want in ref.named_parameters():
        if name.startswith("experts."):
            torch.testing.assert_close(torch.cat([ranks[0][0][name], ranks[1][0][name]]), want.detach(), rtol=0,
                                       atol=0)
        else:
            for params, _ in ranks:
                assert torch.equal(params[name], want.detach()), name
    for _, after in ranks:
        assert torch.equal(after, ref_after)


def test_ep2_training_equals_single_process(tiny_corpus, tmp_path, ep_runs):
    from megatron.training import pretrain

    ref = pretrain(_ep_training_argv(tiny_corpus, tmp_path))
    ranks = ep_runs["training"]
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    for name, want in ref["state"].model.state_dict().items():
        got = (torch.cat([ranks[0]["weights"][name], ranks[1]["weights"][name]]) if name.startswith("layers.1.mlp.experts.")
               else ranks[0]["weights"][name])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
