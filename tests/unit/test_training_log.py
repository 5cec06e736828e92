"""The iteration line's MFU: against the given peak, and flagged when the peak is below what the run does."""
import re

from megatron.arguments import parse_args, train_config_from_args
from megatron.flops import flops_per_token
from megatron.train_state import Progress
from megatron.training_log import format_log

ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
        "--train-iters", "10"]
METRICS = {"lr": 1e-3, "lm_loss": 5.0, "grad_norm": 1.0, "loss_scale": 1.0}


def _mfu(line):
    return float(re.search(r"MFU: ([0-9.]+)%", line).group(1))


def test_mfu_against_the_peak_and_flagged_above_100_percent():
    cfg = train_config_from_args(parse_args(ARGS), 128, 1)
    run_flops = flops_per_token(cfg.model, cfg.moe) * 4 * 32 / 2.0  # 1 iteration of 4 x 32 tokens in 2 s
    at = Progress(1, 4, 128)
    line = format_log(cfg, at, 1, 4 * run_flops, METRICS, 2.0, 1)
    assert _mfu(line) == 25.0 and "above 100%" not in line
    line = format_log(cfg, at, 1, run_flops / 2, METRICS, 2.0, 1)  # a --peak-flops half of what the run does
    assert _mfu(line) == 200.0 and "above 100%: the peak is too low, check --peak-flops" in line
    assert "MFU" not in format_log(cfg, at, 1, None, METRICS, 2.0, 1)
