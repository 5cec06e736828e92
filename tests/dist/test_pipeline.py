"""--pipeline-model-parallel-size 2 equals one process (issue 27): after 4 steps of the tiny corpus (4 layers, 4
micro-batches per step) the per-step lm losses, the logged MoE statistics (aux loss, tokens per expert, dropped
fraction of every MoE layer), the grad norm, the validation loss, every gradient of the last step and every
weight equal PP=1's. Cases: 1F1B dense (tied embedding: its two copies' gradients summed over the embedding group),
GPipe, interleaved (2 virtual stages of 1 layer per rank), uneven stages (--decoder-first-pipeline-num-layers 1),
PR-MoE (2 and 4 experts, residual) with z-loss, the sigmoid + expert-bias router (bias updated from every stage's
counts), and PP=2 x DP=2 with EP=2 inside each stage, ZeRO-1 and full recompute (against DP=2 x EP=2 without PP).
Tolerance rtol 1e-5 / atol 1e-6 (fp32): every micro-batch runs the same ops in the same order; only the tied
embedding's two partial gradients are summed by an all-reduce instead of autograd's accumulation (and DP's sums).
"""
import pytest
import torch

from megatron.training import evaluate, setup_from_argv, train_step
from megatron.training_log import summarize_moe
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed, run_distributed_jobs

TOL = dict(rtol=1e-5, atol=1e-6)
PR_MOE = ["--num-experts", "2", "4", "--expert-interval", "2", "--mlp-type", "residual",
          "--disable-moe-token-dropping", "--topk", "2", "--disable-moe-top2-2nd-expert-sampling",
          "--moe-z-loss-coeff", "1e-3"]
EXPERT_BIAS = ["--num-experts", "4", "--topk", "2", "--disable-moe-token-dropping", "--moe-router-score-function",
               "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "aux_loss",
               "--moe-aux-loss-coeff", "1e-2"]


def argv_for(corpus, tmp_path, *extra):
    return tiny_train_argv(corpus, tmp_path, "--num-layers", "4", "--train-iters", "4", "--hidden-dropout", "0",
                           "--attention-dropout", "0", "--global-batch-size", "8", "--micro-batch-size", "2", *extra)


def run_steps(rank, world_size, argv, steps=4):
    """`steps` train steps and a validation pass: what the comparison needs, on this rank."""
    st, train_iter, make_valid, _ = setup_from_argv(argv)
    try:
        losses, moe, norms, counts = [], [], [], []
        for _ in range(steps):
            m = train_step(st, train_iter)
            losses.append(m["lm_loss"])
            norms.append(m["grad_norm"])
            moe.append(summarize_moe(m["moe_raw"]))
            counts.append([sum(per[i].tokens_per_expert.float() for per in m["moe_raw"])  # [MoE layer] summed
                           for i in range(len(m["moe_raw"][0]))] if m["moe_raw"] else [])  # over micro-batches
        val = evaluate(st, make_valid, 2)
        model = st.model
        return {"losses": losses, "norms": norms, "moe": moe, "val": val, "counts": counts,
                "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}
    finally:
        st.resources.close()


def assert_equal_runs(ref, got):
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), **TOL)
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), **TOL)
    assert got["val"] == pytest.approx(ref["val"], rel=1e-5)
    assert len(got["moe"][0]) == len(ref["moe"][0])  # every stage's MoE layers reach the log
    for mine, theirs in zip(got["moe"], ref["moe"]):
        for a, b in zip(mine, theirs):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    assert got["weights"] and set(got["grads"]) <= set(ref["grads"])
    for k, v in got["weights"].items():  # this stage's part, under the whole model's names
        torch.testing.assert_close(v, ref["weights"][k], **TOL, msg=k)
    for k, v in got["grads"].items():
        torch.testing.assert_close(v, ref["grads"][k], **TOL, msg=k)


def _pp2(corpus, tmp_path, cases):
    refs = [run_steps(0, 1, argv_for(corpus, tmp_path / f"r{i}", *extra)) for i, (extra, _) in enumerate(cases)]
    jobs = [(run_steps, (argv_for(corpus, tmp_path / f"p{i}", *extra, "--pipeline-model-parallel-size", "2",
                                  *pp_flags),)) for i, (extra, pp_flags) in enumerate(cases)]
    for ref, ranks in zip(refs, run_distributed_jobs(jobs, 2)):
        for got in ranks:
            assert_equal_runs(ref, got)
        names = [set(r["weights"]) for r in ranks]
        assert names[0] | names[1] == set(ref["weights"])  # the stages hold the whole model between them
        assert "word_embeddings.weight" in names[0] & names[1] or "output_layer.weight" in names[1]


def test_pp2_interleaved_expert_bias_moe(tiny_corpus, tmp_path):
    _pp2(tiny_corpus, tmp_path, [(EXPERT_BIAS, ["--num-layers-per-virtual-pipeline-stage", "1"])])


@pytest.mark.slow
def test_pp2_1f1b_gpipe_dense_prmoe_uneven(tiny_corpus, tmp_path):
    _pp2(tiny_corpus, tmp_path, [([], []),
                                 (PR_MOE, ["--pipeline-schedule", "gpipe"]),
                                 (PR_MOE, []),
                                 (["--untie-embeddings-and-output-weights"],
                                  ["--decoder-first-pipeline-num-layers", "1"])])


@pytest.mark.slow
def test_pp2_x_dp2_ep2_zero1_recompute_pp2_x_tp2_and_zero2(tiny_corpus, tmp_path):
    """Four ranks: PP=2 x DP=2 (EP=2 inside each stage, ZeRO-1, full recompute) against DP=2 x EP=2 on two ranks,
    PP=2 x TP=2 against TP=2, and PP=2 x DP=2 with ZeRO-2 (untied head) against DP=2 with ZeRO-2 (rank r of a
    pipeline run holds what rank r % 2 of the reference holds)."""
    moe = ["--num-experts", "4", "--topk", "2", "--disable-moe-token-dropping", "--moe-expert-parallel-size", "2",
           "--disable-moe-top2-2nd-expert-sampling", "--zero-stage", "1", "--recompute-granularity", "full",
           "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    zero2 = ["--zero-stage", "2", "--untie-embeddings-and-output-weights"]  # (ZeRO-2 frees the full gradients)
    cases = [moe, ["--tensor-model-parallel-size", "2"], zero2]
    refs = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / f"r{i}", *c),))
                                 for i, c in enumerate(cases)], 2)
    pps = run_distributed_jobs([(run_steps, (argv_for(tiny_corpus, tmp_path / f"p{i}", *c,
                                                      "--pipeline-model-parallel-size", "2"),))
                                for i, c in enumerate(cases)], 4)
    for ref, ranks in zip(refs, pps):
        for rank, got in enumerate(ranks):
            assert_equal_runs(ref[rank % 2], got)
