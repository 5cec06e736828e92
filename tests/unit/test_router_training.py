"""The megatron-core router through the training loop: the expert bias moves once per step and a resumed run
continues exactly (the bias is a checkpointed buffer)."""
import os

import torch

from megatron.training import pretrain
from tests.conftest import tiny_train_argv

ROUTER = ["--num-layers", "2", "--num-experts", "4", "--expert-interval", "2", "--moe-router-topk", "2",
          "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
          "--moe-router-bias-update-rate", "0.01", "--moe-router-load-balancing-type", "seq_aux_loss",
          "--moe-aux-loss-coeff", "0.01", "--hidden-dropout", "0.0"]


def test_expert_bias_training_resumes_exactly(tiny_corpus, tmp_path):
    common = ["--train-iters", "8", *ROUTER]
    straight = pretrain(tiny_train_argv(tiny_corpus, tmp_path / "a", *common))
    bias = straight["state"].model.layers[1].mlp.router.expert_bias
    # 8 steps of ±0.01 per expert (or 0 at exactly the mean): a multiple of 0.01, at most 0.08, not all zero
    assert bias.abs().max() > 0 and bias.abs().max() <= 0.08 + 1e-6
    save = str(tmp_path / "ck")
    first = pretrain(tiny_train_argv(tiny_corpus, tmp_path / "b", *common, "--save", save, "--exit-interval", "4"))
    dense = torch.load(os.path.join(save, "iter_0000004", "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
    assert any(k.endswith("router.expert_bias") for k in dense["model"])
    second = pretrain(tiny_train_argv(tiny_corpus, tmp_path / "b", *common, "--load", save))
    assert straight["losses"] == first["losses"] + second["losses"]
    for k, v in straight["state"].model.state_dict().items():
        assert torch.equal(v, second["state"].model.state_dict()[k]), k
