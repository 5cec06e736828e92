"""MoE GPT through the training loop: loss falls, per-layer stats logged, exact resume with expert files."""
import os

import torch

from megatron.training import pretrain
from tests.conftest import tiny_train_argv

MOE = ["--num-layers", "4", "--num-experts", "4", "--expert-interval", "2", "--topk", "2",
       "--moe-train-capacity-factor", "1.25", "--moe-eval-capacity-factor", "2.0", "--moe-loss-coeff", "0.01"]


def test_moe_gpt_trains_and_logs_expert_load(tiny_corpus, tmp_path, capsys):
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "30", "--hidden-dropout", "0.0", *MOE))
    assert sum(r["losses"][-5:]) / 5 < 0.8 * sum(r["losses"][:5]) / 5
    out = capsys.readouterr().out
    assert "moe layer 0: aux" in out and "moe layer 1: aux" in out and "tokens/expert min" in out
    model = r["state"].model
    assert [type(l.mlp).__name__ for l in model.layers] == ["ParallelMLP", "MoELayer", "ParallelMLP", "MoELayer"]


def test_moe_exact_resume_with_per_expert_files(tiny_corpus, tmp_path):
    common = ["--train-iters", "12", "--hidden-dropout", "0.1", *MOE]
    straight = pretrain(tiny_train_argv(tiny_corpus, tmp_path / "a", *common))
    save = str(tmp_path / "ck")
    first = pretrain(tiny_train_argv(tiny_corpus, tmp_path / "b", *common, "--save", save, "--exit-interval", "6"))
    files = sorted(os.listdir(os.path.join(save, "iter_0000006")))
    # one file per (MoE layer, global expert id) beside the dense shard
    assert [f for f in files if f.startswith("layer_")] == sorted(
        f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(2) for e in range(4))
    dense = torch.load(os.path.join(save, "iter_0000006", "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
    assert not any("experts" in k for k in dense["model"])
    second = pretrain(tiny_train_argv(tiny_corpus, tmp_path / "b", *common, "--load", save))
    assert straight["losses"] == first["losses"] + second["losses"]
    for k, v in straight["state"].model.state_dict().items():
        assert torch.equal(v, second["state"].model.state_dict()[k]), k
