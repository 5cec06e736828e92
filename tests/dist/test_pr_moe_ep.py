"""PR-MoE with per-layer EP sizes (EP 1 for the 2-expert layer, EP 2 for the 4-expert one) on 2 gloo ranks
trains exactly like one process at EP 1 with the same global batch."""
import glob
import math
import os

import torch

from megatron.optimizer import MegatronOptimizer
from megatron.training import pretrain
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed

# Dropless routing, so no token's fate depends on how many tokens a rank holds; no dropout; no random 2nd-expert
# sampling (each DP rank draws from its own generator, unlike one process running the micro-batches in turn). --clip-grad 0.05 is
# far below the gradient norm, so every step clips and the weights depend on the global norm being summed
# correctly over experts with different EP sizes (EP-1 experts are replicated, EP-2 experts are split).
PR_MOE = ["--num-layers", "4", "--num-experts", "2", "4", "--expert-interval", "2", "--mlp-type", "residual",
          "--disable-moe-token-dropping", "--topk", "2", "--disable-moe-top2-2nd-expert-sampling", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
          "--micro-batch-size", "2", "--global-batch-size", "4", "--clip-grad", "0.05", "--eval-iters", "0",
          "--lr-decay-iters", "4"]


def _train(argv) -> dict:
    """pretrain(argv)'s losses and the global grad norm of every step (before clipping)."""
    norms, clip = [], MegatronOptimizer.clip_grad_norm

    def recording_clip(*args, **kwargs):
        norms.append(clip(*args, **kwargs))
        return norms[-1]

    MegatronOptimizer.clip_grad_norm = recording_clip  # every optimizer's step() clips through this method
    try:
        return {"losses": pretrain(argv)["losses"], "norms": norms}
    finally:
        MegatronOptimizer.clip_grad_norm = clip


def _run(rank, world_size, argv):
    return _train(argv)


def _weights(save: str, iteration: int) -> dict:
    """{file/param name: tensor} of the dense shard and every per-expert file of one checkpoint."""
    out = {}
    d = os.path.join(save, f"iter_{iteration:07d}")
    for path in sorted(glob.glob(os.path.join(d, "**", "*.pt"), recursive=True)):
        payload = torch.load(path, weights_only=False)
        for k, v in payload["model"].items():
            out[f"{os.path.relpath(path, d)}:{k}"] = v
    return out


def test_per_layer_ep_equals_single_process(tiny_corpus, tmp_path):
    argv = lambda *extra: tiny_train_argv(tiny_corpus, tmp_path, *PR_MOE, *extra)  # noqa: E731
    start = str(tmp_path / "start")
    # one shared starting point: initial weights depend on how many experts each rank builds
    pretrain(argv("--moe-expert-parallel-size", "1", "--train-iters", "1", "--save", start))
    ref_save, ep_save = str(tmp_path / "ep1"), str(tmp_path / "ep12")
    ref = _train(argv("--moe-expert-parallel-size", "1", "--train-iters", "4", "--load", start, "--save", ref_save))
    ranks = run_distributed(_run, 2, argv("--moe-expert-parallel-size", "1", "2", "--train-iters", "4",
                                          "--load", start, "--save", ep_save))
    assert all(math.isfinite(x) for x in ref["losses"]) and len(ref["losses"]) == 3
    assert min(ref["norms"]) > 0.05  # every step clips
    # fp32: the only differences are summation orders (DP all-reduce vs accumulation, experts' rows grouped by
    # source rank, the norm's partial sums), ~1e-7 relative per step, far below 1e-5 over 3 steps. The norm is
    # the sharp check: Adam is nearly invariant to the clip factor, so a wrong norm moves weights only ~1e-5.
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
    want, got = _weights(ref_save, 4), _weights(ep_save, 4)
    assert sorted(got) == sorted(want) and any("layer_1_expert_3" in k for k in got)
    assert any(".mlp.residual.coefficient.weight" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
