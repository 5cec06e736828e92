"""Graceful stops from the command line: SIGTERM to a running pretrain_gpt.py with --exit-signal-handler (a real
process: the signal is the point), and the --exit-duration-in-mins budget (main(argv) in-process), each finish the
step, save a checkpoint that resumes, and exit 0; a NaN loss stops before the step with exit 2."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron import checkpointing
from tests.conftest import ROOT, tiny_train_argv
from tests.inprocess import run_cli


def _argv(corpus, tmp_path, *extra):
    return [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"),
            *tiny_train_argv(corpus, tmp_path, "--train-iters", "100000", "--log-interval", "1",
                             "--save", str(tmp_path / "ck"), *extra)]


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process-group-with-loader-workers"])
def test_sigterm_finishes_the_step_saves_and_exits_0(tiny_corpus, tmp_path, to_group):
    """to_group: SLURM's preemption/time limit and `pkill -f pretrain_gpt.py` signal every process of the run, the
    DataLoader workers included: they ignore it, so the main process still finishes the step and saves."""
    extra = ("--num-workers", "2") if to_group else ()
    proc = subprocess.Popen(_argv(tiny_corpus, tmp_path, "--exit-signal-handler", *extra), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=to_group)
    deadline, seen = time.time() + 120, 0
    for line in proc.stdout:  # wait until training is under way
        m = re.match(r"\s*iteration\s+(\d+)/", line)
        if m:
            seen = int(m.group(1))
            if seen >= 3:
                break
        assert time.time() < deadline, "training did not start"
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)  # the workers exist once an iteration has run
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    m = re.search(r"exiting at iteration (\d+) \(--exit-signal-handler: SIGTERM received\)", out)
    assert m, out[-2000:]
    stopped = int(m.group(1))
    assert stopped >= seen
    ckpt_dir, it = checkpointing.resolve_checkpoint_dir(str(tmp_path / "ck"))
    assert it == stopped
    assert checkpointing.load_dense(str(tmp_path / "ck"))[0]["iteration"] == stopped


def test_exit_duration_saves_and_exits_0(tiny_corpus, tmp_path):
    r = run_cli("pretrain_gpt.py", _argv(tiny_corpus, tmp_path, "--exit-duration-in-mins", "0.0001")[2:])
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"exiting at iteration (\d+) \(--exit-duration-in-mins 0.0001\)", r.stdout)
    assert m, r.stdout[-2000:]
    assert checkpointing.resolve_checkpoint_dir(str(tmp_path / "ck"))[1] == int(m.group(1)) >= 1


def test_nan_loss_stops_before_the_step_and_never_saves_it(tiny_corpus, tmp_path):
    """An absurd --lr makes the weights overflow after step 1, so step 2's loss is NaN: the CLI stops there with one
    line naming iteration 2, rank 0 and the MoE router (exit 2), and the only checkpoint is step 1's (finite)."""
    import torch

    r = run_cli("pretrain_gpt.py", tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "6", "--lr", "1e30",
                                                   "--lr-warmup-iters", "0", "--save", str(tmp_path / "ck"),
                                                   "--save-interval", "1", "--num-experts", "4"))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "iteration 2, rank 0" in errors[0] and "stopped before the optimizer step" in errors[0], errors[0]
    assert "MoE layer" in errors[0] or "lm loss is nan" in errors[0], errors[0]
    assert checkpointing.resolve_checkpoint_dir(str(tmp_path / "ck"))[1] == 1
    payload, _ = checkpointing.load_dense(str(tmp_path / "ck"))
    assert all(bool(torch.isfinite(v).all()) for v in payload["model"].values() if v.is_floating_point())
