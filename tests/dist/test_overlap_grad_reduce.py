"""--overlap-grad-reduce (buckets all-reduced, or ZeRO-2 reduce-scattered, from gradient hooks during the last
micro-batch's backward) trains bit for bit like the reduction after the backward: fp32, 2 gloo ranks (DP=2; with
MoE EP=2), plain AdamW, ZeRO-1 and ZeRO-2. Exact, not close: each element's sum has the same two summands (on 2
ranks their order cannot differ), and nothing else changes."""
import torch

from megatron.training import pretrain
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed

# 2 micro-batches per rank per step (the hooks must wait for the last one); a bucket size far below the model's
# size, so the dense gradients form several buckets launched while the backward continues
OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "3000"]
MOE = ["--num-experts", "4", "--topk", "2", "--moe-expert-parallel-size", "2"]
VARIANTS = {"dense": [], "moe-ep2": MOE, "moe-ep2-zero1": MOE + ["--zero-stage", "1"],
            "moe-ep2-zero2": MOE + ["--zero-stage", "2"]}


def _run(rank, world_size, base):
    out = {}
    for name, extra in VARIANTS.items():
        for overlap in (False, True):
            r = pretrain(base + extra + (OVERLAP if overlap else []))
            reducer = r["state"].optimizer.reducer
            out[(name, overlap)] = {"losses": r["losses"], "hook_launches": reducer.hook_launches if reducer else 0,
                                    "weights": {k: v.detach().clone() for k, v in r["state"].model.state_dict().items()}}
    return out


def test_overlapped_reduction_equals_the_reduction_after_the_backward(tiny_corpus, tmp_path):
    base = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--global-batch-size", "8",
                           "--micro-batch-size", "2")
    for rank_out in run_distributed(_run, 2, base):
        for name in VARIANTS:
            ref, got = rank_out[(name, False)], rank_out[(name, True)]
            # the overlap happened: buckets (several per step) were launched from hooks during the backward
            assert got["hook_launches"] >= 2 * 4, (name, got["hook_launches"])
            assert got["losses"] == ref["losses"], name  # exact: see the module docstring
            for k, v in ref["weights"].items():
                assert torch.equal(got["weights"][k], v), (name, k)
