"""The megatron-core router in training at TP=2 x DP=2 x EP=2 (world 4, gloo) equals one process: sigmoid scores,
group-limited top-2, expert bias (counts summed over DP and EP ranks by step_routers), seq_aux_loss and z-loss."""
import torch

from megatron.training import pretrain
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed

ROUTER = ["--num-experts", "4", "--expert-interval", "2", "--moe-router-topk", "2", "--moe-router-score-function",
          "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
          "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", "--moe-router-load-balancing-type",
          "seq_aux_loss", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001"]


def _train(rank, world_size, argv):
    r = pretrain(argv)
    sd = r["state"].model.state_dict()
    return {"losses": r["losses"], "router": {k: v.clone() for k, v in sd.items() if ".router." in k}}


def test_tp2_dp2_ep2_router_training_equals_single_process(tiny_corpus, tmp_path):
    argv = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "5", "--hidden-dropout", "0.0",
                           "--attention-dropout", "0.0", "--clip-grad", "0.05", *ROUTER)
    ref = pretrain(argv)
    ref_router = {k: v for k, v in ref["state"].model.state_dict().items() if ".router." in k}
    # five steps of ±rate (0 only at an exact tie): the bias cannot have returned to 0
    assert any(k.endswith("expert_bias") and v.abs().max() > 0 for k, v in ref_router.items())
    ranks = run_distributed(_train, 4, argv + ["--tensor-model-parallel-size", "2", "--moe-expert-parallel-size", "2"])
    for r in ranks:
        # fp32 sums reassociated over ranks (as tests/dist/test_tensor_parallel.py): 1e-5
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
        for name, want in ref_router.items():
            if name.endswith("expert_bias"):  # ±rate steps from integer counts: exact
                assert torch.equal(r["router"][name], want), name
            else:
                torch.testing.assert_close(r["router"][name], want, rtol=1e-4, atol=1e-5, msg=name)
