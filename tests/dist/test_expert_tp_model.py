"""Expert tensor parallelism in the whole model (issue 27): GPT-MoE training steps on the folded expert grid
(--expert-tensor-parallel-size 2, EP folded over TP) equal the same run with experts replicated over TP (ETP = 1):
per-step losses, aux losses, load statistics, gradient norms (clipping active), and every weight after 3 AdamW
steps, the expert shards gathered and merged. Covers the gradient reduction over the grid's expert-DP group, the
norm over ETP x EP (no shard counted twice or missed), --sequence-parallel, ZeRO-2, and the expert-bias router."""
import pytest
import torch
import torch.distributed as dist

from megatron import parallel_state
from megatron.config import ModelConfig, OptimizerConfig
from megatron.context_parallel import finalize_model_grads
from megatron.model import GPTModel
from megatron.optimizer.optimizer import build_optimizer
from moe import gating
from moe.config import MoEConfig
from moe.experts import etp_merge, is_expert_param
from tests.dist.launcher import run_distributed_jobs
from tests.dist.test_sequence_parallel import COMMON, LLAMA, MOE

CASES = {  # name: (model kwargs, MoE kwargs)
    "llama-sigmoid-bias-swiglu": (LLAMA, dict(router_family="megatron", score_function="sigmoid", expert_bias=True,
                                              bias_update_rate=1e-2, **MOE)),
    "gpt2-deepspeed-capacity-gelu": ({}, dict(MOE, drop_tokens=True, train_capacity_factor=1.0, min_capacity=1,
                                              second_expert_sampling=False, use_rts=False)),
    "llama-recompute-full": (dict(LLAMA, recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1), dict(router_family="megatron", **MOE)),
}
STEPS = 3


def _gathered(model, groups, ep):
    """Every weight in the ETP = 1 layout: expert shards gathered over ETP (merged) and EP (stacked)."""
    out = {}
    etp_group, ep_group = groups.etp_group(ep), groups.ep_group(ep)
    for name, p in model.named_parameters():
        t = p.detach().clone()
        if is_expert_param(p):
            if getattr(p, "etp_dim", None) is not None and etp_group is not None:
                parts = [torch.empty_like(t) for _ in range(etp_group.size())]
                dist.all_gather(parts, t, group=etp_group)
                t = etp_merge(parts, p.etp_dim, p.etp_gated)
            if ep_group is not None and ep_group.size() > 1:
                parts = [torch.empty_like(t) for _ in range(ep_group.size())]
                dist.all_gather(parts, t, group=ep_group)
                t = torch.cat(parts)
        out[name] = t
    return out


def _train(groups, case, ep, zero):
    model_kw, moe_kw = CASES[case]
    cfg = ModelConfig(**COMMON, **model_kw)
    moe = MoEConfig(num_experts=(4,), ep_size=(ep,), **moe_kw)
    torch.manual_seed(11)
    model = GPTModel(cfg, moe, groups)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-2, clip_grad=0.05, weight_decay=0.1), groups, zero_stage=zero)
    log = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + groups.dp_rank)
        tokens = torch.randint(0, 96, (2, 16), generator=g)
        labels = torch.randint(0, 96, (2, 16), generator=g)
        out = model(tokens, labels, return_logits=False)
        aux = sum(s.aux_loss for s in out.moe_stats)
        (out.loss.mean() + moe.loss_coeff * aux).backward()
        finalize_model_grads(model, groups)
        result = opt.step()
        opt.zero_grad()
        gating.step_routers(model, groups.dp_group)
        log.append((out.loss.mean().item(), aux.item(), [s.tokens_per_expert.clone() for s in out.moe_stats],
                    result.grad_norm))
    return log, _gathered(model, groups, ep)


def _worker(rank, world, case, tp, etp, ep, sp, zero, cp=1):
    """(ETP = 1 replicated run, folded run) on the same ranks and data."""
    ref_groups = parallel_state.initialize(tp, (1,), sequence_parallel=sp, cp_size=cp)
    ref = _train(ref_groups, case, 1, zero)
    groups = parallel_state.initialize(tp, (ep,), etp_size=etp, sequence_parallel=sp, cp_size=cp)
    assert groups.expert_folded
    return ref, _train(groups, case, ep, zero)


# (case, TP, ETP, EP, SP, ZeRO stage)
CASES_2 = [("llama-sigmoid-bias-swiglu", 2, 2, 1, False, 0),   # ETP = TP, tokens de-duplicated over TP
           ("gpt2-deepspeed-capacity-gelu", 2, 2, 1, True, 0),  # with --sequence-parallel (no de-dup needed)
           ("gpt2-deepspeed-capacity-gelu", 1, 2, 1, False, 0),  # ETP over DP ranks
           ("llama-sigmoid-bias-swiglu", 2, 1, 2, False, 0),   # EP folded over TP (EP 2, DP 1)
           ("llama-sigmoid-bias-swiglu", 1, 2, 1, False, 2),   # ETP with ZeRO-2 over DP
           ("llama-sigmoid-bias-swiglu", 1, 2, 1, False, 0, 2),  # ETP over the CP pair (--context-parallel-size 2)
           ("gpt2-deepspeed-capacity-gelu", 1, 1, 2, False, 0, 2),  # EP folded over CP
           ("llama-recompute-full", 2, 2, 1, False, 0)]  # the folded layer's collectives re-run in the recompute
CASES_4 = [("llama-sigmoid-bias-swiglu", 2, 2, 2, False, 0),   # TP 2 x DP 2, expert grid ETP 2 x EP 2
           ("gpt2-deepspeed-capacity-gelu", 2, 1, 4, True, 1)]  # EP 4 over TP x DP with SP, ZeRO-1
# fp32; the folded run sums ETP partials, TP slices and expert-DP gradients in another order: ~1e-7 relative per
# step, amplified a little by Adam's normalisation over 3 steps. 1e-5 catches any wrong shard, reduction or norm
# (those are O(1e-2) and more after one step at lr 1e-2).
TOL = dict(rtol=1e-5, atol=1e-5)


def _check(per_rank):
    for ref, got in per_rank:
        (ref_log, ref_w), (log, w) = ref, got
        for (l0, a0, t0, n0), (l1, a1, t1, n1) in zip(ref_log, log):
            torch.testing.assert_close(torch.tensor([l1, a1, n1]), torch.tensor([l0, a0, n0]), **TOL)
            assert all(torch.equal(x, y) for x, y in zip(t0, t1))
        assert ref_w.keys() == w.keys()
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], **TOL, msg=k)


@pytest.fixture(scope="module")
def results_2():
    return run_distributed_jobs([(_worker, c) for c in CASES_2], world_size=2)


def _ids(cases):
    return [f"{c[0]}-tp{c[1]}-etp{c[2]}-ep{c[3]}-sp{int(c[4])}-zero{c[5]}" + (f"-cp{c[6]}" if len(c) > 6 else "")
            for c in cases]


@pytest.mark.parametrize("i", range(len(CASES_2)), ids=_ids(CASES_2))
def test_folded_training_equals_replicated_2_ranks(results_2, i):
    _check(results_2[i])


@pytest.mark.slow  # four processes on the shared cores
@pytest.mark.parametrize("i", range(len(CASES_4)), ids=_ids(CASES_4))
def test_folded_training_equals_replicated_4_ranks(i):
    _check(run_distributed_jobs([(_worker, CASES_4[i])], world_size=4)[0])
