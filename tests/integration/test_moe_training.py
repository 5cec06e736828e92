"""MoE GPT through the training loop: loss falls, per-layer stats logged (exact resume with expert files:
tests/integration/test_resume_exactness.py)."""
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

