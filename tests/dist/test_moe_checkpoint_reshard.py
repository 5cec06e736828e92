"""A MoE checkpoint written at EP=2 loads at EP=1 (and the reverse) with equal validation loss."""
from megatron.training import pretrain
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed_jobs

# eval capacity factor 4 with 4 experts, top-1: C >= T, so no token is dropped at either EP size and the
# validation loss does not depend on how tokens are split across ranks
MOE = ["--num-layers", "2", "--num-experts", "4", "--expert-interval", "2", "--moe-eval-capacity-factor", "4.0",
       "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--global-batch-size", "8", "--eval-iters", "3"]


def _run(rank, world_size, argv):
    r = pretrain(argv)
    return r["val_loss"]


def _argv(corpus, tmp, mbs, ep, *extra):
    return tiny_train_argv(corpus, tmp, *MOE, "--micro-batch-size", str(mbs), "--moe-expert-parallel-size",
                           str(ep), *extra)


def test_ep2_checkpoint_loads_at_ep1_and_back(tiny_corpus, tmp_path):
    save2, save1 = str(tmp_path / "ep2"), str(tmp_path / "ep1")
    # EP=1 in one process trains 6 steps and saves (first, so that one spawn does both EP=2 runs below)
    v1b = pretrain(_argv(tiny_corpus, tmp_path, 4, 1, "--train-iters", "6", "--save", save1))["val_loss"]
    # EP=2 on 2 ranks (DP=2, micro-batch 2) trains 6 steps and saves; then EP=2 loads the EP=1 checkpoint
    vals, vals2 = run_distributed_jobs([
        (_run, (_argv(tiny_corpus, tmp_path, 2, 2, "--train-iters", "6", "--save", save2),)),
        (_run, (_argv(tiny_corpus, tmp_path, 2, 2, "--train-iters", "6", "--load", save1),))], 2)
    # EP=1 in one process with micro-batch 4 sees exactly the same validation samples per step
    v1 = pretrain(_argv(tiny_corpus, tmp_path, 4, 1, "--train-iters", "6", "--load", save2))["val_loss"]
    assert abs(v1 - vals[0]) < 1e-5, (v1, vals)  # fp32; same math, different token grouping in the GEMMs

    assert abs(vals2[0] - v1b) < 1e-5, (v1b, vals2)
