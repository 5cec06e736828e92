"""examples_moe/gpu_check.sh without a GPU: the script parses, its dry run prints every step, and the training
benchmark it calls runs a tiny config on the CPU with the figures the check prints."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "examples_moe", "gpu_check.sh")


def test_script_parses_and_dry_run_lists_every_step():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    out = subprocess.run(["bash", SCRIPT, "--dry-run"], check=True, capture_output=True, text=True).stdout
    for name in ("gpu-tests", "cuda-unit-tests", "train-moe-h512-bf16", "train-350m-moe16-bf16", "aio-bandwidth",
                 "offload-inference", "moe-layer-gemm"):
        assert f"=== {name}: " in out
    assert "-m gpu tests/gpu" in out and "--peak-flops 989e12" in out


def test_step_benchmark_runs_a_tiny_config_on_the_cpu(monkeypatch, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_gpu_step

    monkeypatch.setattr(sys, "argv", ["bench_gpu_step.py", "--config", "tiny", "--steps", "1", "--warmup", "1",
                                      "--vocab-size", "256", "--bf16", "--peak-flops", "1e11"])
    assert bench_gpu_step.main() == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tokens_per_s", "tflops_per_s", "mfu_percent", "peak_memory_GiB", "host_syncs_per_step",
                "aten_ops_per_step"):
        assert key in out
    assert out["dtype"] == "bfloat16" and out["peak_source"] == "--peak-flops"
