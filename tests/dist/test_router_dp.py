"""Load-balancing losses and the expert-bias update do not depend on the data-parallel size or the micro-batch split
(docs/design.md "Routers"): DP=2 on gloo against one process over the same global batch, and micro-batch splits
1x4, 2x2, 4x1 against each other, for aux_loss, seq_aux_loss and global_aux_loss (value, router weight gradient,
expert-bias update)."""
import pytest
import torch
import torch.distributed as dist

from moe.config import MoEConfig
from moe.gating import TopKRouter, step_routers
from tests.dist.launcher import run_distributed

E, D, S, GLOBAL_B = 8, 6, 5, 4
TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


def _router(lb: str, group=None) -> TopKRouter:
    cfg = MoEConfig(num_experts=E, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                    load_balancing_type=lb, loss_coeff=0.1, router_dtype="fp64")
    router = TopKRouter(cfg, D, dp_group=group)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(1)))
    return router


def _batch():
    return torch.randn(GLOBAL_B, S, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def train_step(router: TopKRouter, micro_batches, group=None):
    """The training step's arithmetic: loss = mean over micro-batches of (coeff · aux + a task term), backward
    per micro-batch, gradients averaged over DP, then step_routers. Returns (loss, weight grad, expert bias)."""
    total = torch.zeros((), dtype=torch.float64)
    for x_BSD in micro_batches:
        r = router(x_BSD.reshape(-1, D), num_sequences=x_BSD.shape[0])
        loss = router.cfg.loss_coeff * r.aux_loss + r.gates_TK.double().mean()
        (loss / len(micro_batches)).backward()
        total += loss.detach() / len(micro_batches)
    grad = router.weight.grad.clone()
    if group is not None:
        dist.all_reduce(grad, group=group)
        dist.all_reduce(total, group=group)
        grad /= dist.get_world_size(group)
        total /= dist.get_world_size(group)
    step_routers(router, group)
    return float(total), grad, router.expert_bias.clone()


def _dp_worker(rank, world_size):
    """Each rank takes its half of the global batch as one micro-batch."""
    out = {}
    per = GLOBAL_B // world_size
    for lb in TYPES:
        router = _router(lb, dist.group.WORLD)
        out[lb] = train_step(router, [_batch()[rank * per:(rank + 1) * per]], dist.group.WORLD)
    return out


def _split(micro):
    x = _batch()
    return [x[i:i + micro] for i in range(0, GLOBAL_B, micro)]


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(_dp_worker, 2)


@pytest.mark.parametrize("lb", TYPES)
def test_dp2_equals_one_process(dp2, lb):
    """aux_loss is per micro-batch, so DP=2 (one micro-batch of 2 each) equals one process accumulating the same two
    micro-batches; seq_aux_loss equals that and one micro-batch of all 4 sequences; global_aux_loss (counts of the
    whole global batch, over DP) equals one micro-batch of all 4 sequences."""
    references = {"aux_loss": [2], "seq_aux_loss": [2, 4], "global_aux_loss": [4]}[lb]
    references = [train_step(_router(lb), _split(micro)) for micro in references]
    for ref in references:
        for rank in dp2:
            value, grad, bias = rank[lb]
            # the router computes in fp64 but hands back fp32 weights and losses (Routing), and the sums are
            # reassociated across ranks: fp32 round-off, 1e-6 relative (a wrong scale would be off by 2x)
            assert abs(value - ref[0]) <= 1e-6 * abs(ref[0])
            assert torch.allclose(grad, ref[1], rtol=1e-5, atol=1e-8)
            assert torch.equal(bias, ref[2])  # counts are integers: exact


@pytest.mark.parametrize("lb", ["seq_aux_loss"])
def test_micro_batch_split_does_not_matter(lb):
    """seq_aux_loss: 1 micro-batch of 4 sequences = 2 of 2 = 4 of 1 (value, gradient, expert bias)."""
    ref = train_step(_router(lb), _split(4))
    for micro in (2, 1):
        value, grad, bias = train_step(_router(lb), _split(micro))
        assert abs(value - ref[0]) <= 1e-6 * abs(ref[0])  # fp32 results of reassociated sums
        assert torch.allclose(grad, ref[1], rtol=1e-5, atol=1e-8)
        assert torch.equal(bias, ref[2])


def test_aux_loss_is_per_micro_batch():
    """aux_loss (megatron-core's definition) balances each micro-batch: a 4x1 split is a different loss from 1x4,
    which is why the DP test compares equal micro-batches."""
    assert abs(train_step(_router("aux_loss"), _split(1))[0] - train_step(_router("aux_loss"), _split(4))[0]) > 1e-6


def _whitened_router(group=None) -> TopKRouter:
    cfg = MoEConfig(num_experts=E, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                    drop_tokens=False, router_input_centering="causal", router_input_whitening=0.5)
    router = TopKRouter(cfg, D, dp_group=group)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(1)))
    return router


def _whitening_steps(router, shard, group=None):
    """Three training forwards (each folds its covariance in, so the later ones route with W of the earlier ones);
    per forward: (experts chosen, gates) of this rank's sequences; then the moving covariance and W."""
    out = []
    mix = torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * torch.logspace(
        0, 1.5, D, dtype=torch.float64)
    for step in range(3):
        x_BSD = torch.randn(GLOBAL_B, S, D, generator=torch.Generator().manual_seed(10 + step),
                            dtype=torch.float64) @ mix
        x_BSD = x_BSD[shard].float().requires_grad_()
        r = router(x_BSD.reshape(-1, D), num_sequences=x_BSD.shape[0])
        out.append((r.expert_TK.clone(), r.gates_TK.detach().clone()))
    return out, router.input_cov.clone(), router.input_whiten.clone()


def _whitening_worker(rank, world_size):
    per = GLOBAL_B // world_size
    return _whitening_steps(_whitened_router(dist.group.WORLD), slice(rank * per, (rank + 1) * per),
                            dist.group.WORLD)


def test_input_whitening_dp2_equals_one_process():
    """--moe-router-input-whitening-momentum under DP=2: the covariance is all-reduced over the DP group, so both
    ranks hold the same Sigma and W as one process whose micro-batch is the global batch, and route their halves
    the same way (experts equal, gates to 1e-6); Sigma to 1e-12 (float64 sums in another order)."""
    ref_routes, ref_cov, ref_w = _whitening_steps(_whitened_router(), slice(0, GLOBAL_B))
    per = GLOBAL_B // 2
    for rank, (routes, cov, w) in enumerate(run_distributed(_whitening_worker, 2)):
        assert torch.allclose(cov, ref_cov, rtol=0, atol=1e-12) and torch.allclose(w, ref_w, rtol=0, atol=1e-9)
        for (expert, gates), (ref_expert, ref_gates) in zip(routes, ref_routes):
            rows = slice(rank * per * S, (rank + 1) * per * S)
            assert torch.equal(expert, ref_expert[rows])
            assert torch.allclose(gates, ref_gates[rows], rtol=0, atol=1e-6)
