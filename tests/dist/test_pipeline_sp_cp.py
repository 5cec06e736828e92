"""Pipeline parallelism with sequence and context parallelism (issue 27), on four gloo processes: the stages send
the sequence-sharded / context-chunked activation [b, s/TP, h] / [b, s/CP, h], the first stage embeds (and
scatters, or takes this CP rank's chunks of) the tokens, the last all-gathers for the head (SP) or gathers the
per-token loss back to the whole sequence (CP), and finalize_model_grads sums the SP norms' gradients over TP and
every gradient over CP after the schedule, as without PP.

- PP=2 x TP=2 with --sequence-parallel, 1F1B and interleaved (2 virtual stages of 1 layer per rank); MoE: 4
  experts, top-2, dropless, sigmoid router with expert bias updated from every stage's counts, aux and z-loss;
  against TP=2 with --sequence-parallel (rank r against rank r % 2: TP is the fastest rank coordinate): per-step
  losses, logged MoE statistics, grad norms, validation loss, every gradient of the last step and every weight
  (expert bias included) after 4 steps; and against TP=2 without SP (independent of SP's own pieces): all of that
  but the per-rank token statistics, and the two TP ranks' tokens per expert summed equal to SP-off's (each SP
  rank routes its half of the sequence).
- PP=2 x CP=2, MoE with the softmax router (aux + z-loss; RoPE, so every stage needs its CP chunks' positions)
  and with the sigmoid expert-bias router, against CP=2 without PP (rank r against rank r % 2: all of the above),
  and against one process: losses, grad norms, validation loss, gradients, weights, every MoE layer's aux loss
  and dropped fraction, and its tokens per expert summed over the two CP ranks (each CP rank routes, and logs,
  its own half of the sequence, as without PP).
- Exact resume at PP=2 x CP=2 and the checkpoint loaded in one process (validation loss).
- All three: PP=2 x CP=2 x TP=2 with --sequence-parallel (8 ranks) against CP=2 x TP=2 with SP (4 ranks).
They spawn 2 + 4 (the last 4 + 8) processes: ~20-50 s each on the shared 2-core machine, so all run in
`make test-all` (slow); tests/dist/test_pipeline_config.py checks (fast) that the combinations now validate.
Tolerance: test_pipeline's rtol 1e-5 / atol 1e-6 (fp32; TP/CP/SP sum the same partial products in another order;
the token counts are integers, compared exactly).
"""
import copy
import os

import pytest
import torch

from tests.dist.launcher import run_distributed_jobs
from tests.dist.test_pipeline import EXPERT_BIAS, argv_for, assert_equal_runs, run_steps

MOE = ["--num-experts", "4", "--topk", "2", "--disable-moe-token-dropping", "--disable-moe-top2-2nd-expert-sampling",
       "--moe-z-loss-coeff", "1e-3"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def _compare(refs, runs):
    for rank, got in enumerate(runs):
        assert_equal_runs(refs[rank % len(refs)], got)


def _routing_only_aux(run):
    """`run` with the per-rank token statistics left out of the MoE summaries (aux loss and dropped kept)."""
    out = copy.copy(run)
    out["moe"] = [[{k: layer[k] for k in ("aux_loss", "dropped")} for layer in step] for step in run["moe"]]
    return out


def _counts_sum_to(whole, runs):
    """Each pipeline stage's pair of ranks 2s, 2s+1 (its two TP or CP ranks: the fastest rank coordinate, then PP)
    routed halves of the tokens whose tokens per expert, summed, are `whole`'s (every MoE layer, every step)."""
    assert whole["counts"][0]  # the MoE layers of both stages, every step
    for pp_stage in (0, 1):
        a, b = runs[2 * pp_stage], runs[2 * pp_stage + 1]
        for step, ref in enumerate(whole["counts"]):
            for layer, counts in enumerate(ref):
                torch.testing.assert_close(a["counts"][step][layer] + b["counts"][step][layer], counts, rtol=0, atol=0)


@pytest.mark.slow
def test_pp2_x_tp2_sequence_parallel_moe(tiny_corpus, tmp_path):
    tp = ["--tensor-model-parallel-size", "2", *EXPERT_BIAS, "--moe-z-loss-coeff", "1e-3"]
    sp_ref, tp_ref = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / "s", *tp,
                                                                 "--sequence-parallel"),)),
                                           (run_steps, (argv_for(tiny_corpus, tmp_path / "t", *tp),))], 2)
    pps = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / f"p{i}", *tp, "--sequence-parallel",
                                                      *PP2, *extra),))
                                for i, extra in enumerate(([], ["--num-layers-per-virtual-pipeline-stage", "1"]))], 4)
    for got in pps:  # 1F1B, interleaved 1F1B (2 virtual stages of 1 layer per rank)
        _compare(sp_ref, got)
        # SP off: an independent reference for what SP adds (its norm-gradient sums over TP, the scatter and gather)
        _compare([_routing_only_aux(r) for r in tp_ref], [_routing_only_aux(g) for g in got])
        _counts_sum_to(tp_ref[0], got)


@pytest.mark.slow
def test_pp2_x_cp2_moe_equals_cp2_and_one_process(tiny_corpus, tmp_path):
    rope = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu"]  # positions on every stage
    cases = [[*MOE, "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2", *rope],
             [*EXPERT_BIAS, "--moe-z-loss-coeff", "1e-3"]]
    singles = [run_steps(0, 1, argv_for(tiny_corpus, tmp_path / f"s{i}", *c)) for i, c in enumerate(cases)]
    cp2 = ["--context-parallel-size", "2"]
    cp2s = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / f"c{i}", *c, *cp2),))
                                 for i, c in enumerate(cases)], 2)
    pps = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / f"p{i}", *c, *PP2, *cp2),))
                                for i, c in enumerate(cases)], 4)
    for single, ref, got in zip(singles, cp2s, pps):
        _compare(ref, got)
        _compare([_routing_only_aux(single)], [_routing_only_aux(g) for g in got])
        _counts_sum_to(single, got)


@pytest.mark.slow
def test_pp2_x_cp2_exact_resume_and_load_at_one_process(tiny_corpus, tmp_path):
    """Exact resume at PP=2 x CP=2 (MoE): 2 steps, save, 2 more equal 4 straight, bit for bit (losses and weights
    on every rank); the checkpoint loads in one process with the validation loss of the 4-rank run (rel 1e-5: CP's
    gathered attention sums in another order)."""
    from tests.dist.test_pipeline_checkpoint import _train, _val

    base = argv_for(tiny_corpus, tmp_path, *MOE)
    par = [*PP2, "--context-parallel-size", "2"]
    s1, s2 = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight, first_half, resumed = run_distributed_jobs([
        (_train, (base + par + ["--save", s1, "--save-interval", "2"],)),
        (_train, (base + par + ["--exit-interval", "2", "--save", s2],)),
        (_train, (base + par + ["--load", s2, "--save", s2],)),
    ], 4)
    for rank in range(4):
        assert first_half[rank]["losses"] + resumed[rank]["losses"] == straight[rank]["losses"]
        for k, v in straight[rank]["weights"].items():
            assert torch.equal(resumed[rank]["weights"][k], v), k
    val = straight[0]["val"]
    assert _val(0, 1, base + ["--load", os.path.join(s1, "iter_0000004")]) == pytest.approx(val, rel=1e-5)


@pytest.mark.slow
def test_pp2_x_tp2_x_cp2_sequence_parallel_moe(tiny_corpus, tmp_path):
    """Eight ranks: PP=2 x CP=2 x TP=2 with --sequence-parallel (the activation [b, s/(CP·TP), h]) against
    CP=2 x TP=2 with --sequence-parallel on four (rank r against rank r % 4: TP, then CP, then PP)."""
    par = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
           *EXPERT_BIAS, "--moe-z-loss-coeff", "1e-3"]
    ref, = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / "r", *par),))], 4)
    got, = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / "p", *par, *PP2),))], 8)
    _compare(ref, got)
