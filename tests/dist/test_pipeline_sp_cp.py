"""Pipeline parallelism with sequence and context parallelism (issue 27), on four gloo processes: the stages send
the sequence-sharded / context-chunked activation [b, s/TP, h] / [b, s/CP, h], the first stage embeds (and
scatters, or takes this CP rank's chunks of) the tokens, the last all-gathers for the head (SP) or gathers the
per-token loss back to the whole sequence (CP), and finalize_model_grads sums the SP norms' gradients over TP and
every gradient over CP after the schedule, as without PP.

- PP=2 x TP=2 with --sequence-parallel against TP=2 with --sequence-parallel (rank r against rank r % 2: TP is
  the fastest rank coordinate), MoE (4 experts, top-2, dropless, z-loss): per-step losses, logged MoE statistics,
  grad norms, validation loss, every gradient of the last step and every weight after 4 steps.
- PP=2 x CP=2 (MoE, megatron-core aux loss + z-loss) against CP=2 without PP (rank r against rank r % 2: all of
  the above), and against one process: losses, grad norms, validation loss, gradients, weights, every MoE layer's
  aux loss and dropped fraction, and its tokens per expert summed over the two CP ranks (each CP rank routes, and
  logs, its own half of the sequence, as without PP).
Tolerance: test_pipeline's rtol 1e-5 / atol 1e-6 (fp32; TP/CP/SP sum the same partial products in another order;
the token counts are integers, compared exactly).
"""
import copy

import pytest
import torch

from tests.dist.launcher import run_distributed_jobs
from tests.dist.test_pipeline import argv_for, assert_equal_runs, run_steps

MOE = ["--num-experts", "4", "--topk", "2", "--disable-moe-token-dropping", "--disable-moe-top2-2nd-expert-sampling",
       "--moe-z-loss-coeff", "1e-3"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def _compare(refs, runs):
    for rank, got in enumerate(runs):
        assert_equal_runs(refs[rank % len(refs)], got)


@pytest.mark.slow
def test_pp2_x_tp2_sequence_parallel_moe(tiny_corpus, tmp_path):
    sp = ["--tensor-model-parallel-size", "2", "--sequence-parallel", *MOE]
    ref, = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / "r", *sp),))], 2)
    got, = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / "p", *sp, *PP2),))], 4)
    _compare(ref, got)


def _routing_only_aux(run):
    """`run` with the per-rank token statistics left out of the MoE summaries (aux loss and dropped kept)."""
    out = copy.copy(run)
    out["moe"] = [[{k: layer[k] for k in ("aux_loss", "dropped")} for layer in step] for step in run["moe"]]
    return out


@pytest.mark.slow
def test_pp2_x_cp2_moe_equals_cp2_and_one_process(tiny_corpus, tmp_path):
    cp = [*MOE, "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2"]
    single = run_steps(0, 1, argv_for(tiny_corpus, tmp_path / "s", *cp))
    cp2, = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / "c", *cp,
                                                       "--context-parallel-size", "2"),))], 2)
    got, = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / "p", *cp, *PP2,
                                                       "--context-parallel-size", "2"),))], 4)
    _compare(cp2, got)
    _compare([_routing_only_aux(single)], [_routing_only_aux(g) for g in got])
    assert single["counts"][0]  # the MoE layers of both stages, every step
    for pp_stage in (0, 1):  # ranks 2s, 2s+1: CP ranks 0 and 1 of pipeline stage s (TP=1, CP next-fastest)
        halves = got[2 * pp_stage], got[2 * pp_stage + 1]
        for step, ref in enumerate(single["counts"]):
            for layer, whole in enumerate(ref):
                torch.testing.assert_close(halves[0]["counts"][step][layer] + halves[1]["counts"][step][layer],
                                           whole, rtol=0, atol=0)
