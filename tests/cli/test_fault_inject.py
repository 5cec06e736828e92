"""tools/fault_inject.py as a user runs it: EP=2 under torchrun (gloo), SIGKILLs mid-step, mid-checkpoint-write and
between tracker write and rename; every restart loads the last complete checkpoint and the end state equals an
uninterrupted run bit for bit. The fast case takes 4 seeded kills; the slow one the issue's 20."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_train_argv

MOE = ["--num-experts", "4", "--expert-interval", "2", "--moe-expert-parallel-size", "2", "--topk", "2",
       "--micro-batch-size", "2", "--global-batch-size", "8"]


def _run(corpus, tmp_path, kills, seed, iters, *extra):
    flags = tiny_train_argv(corpus, tmp_path, *MOE, "--train-iters", str(iters), "--save-interval", "2", *extra)
    i = flags.index("--peak-flops")  # default flags: the start-up probe runs, as for a user
    del flags[i:i + 2]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fault_inject.py"), "--kills", str(kills),
                        "--seed", str(seed), "--work-dir", str(tmp_path / "fi"), "--", *flags],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    print(r.stdout)
    assert f"kills survived: {kills}/{kills}" in r.stdout and "equal to the uninterrupted run: yes" in r.stdout
    return r.stdout


def test_four_kills_survived_exactly(tiny_corpus, tmp_path):
    out = _run(tiny_corpus, tmp_path, 4, 3, 10)
    assert out.count("\nkill ") == 4


@pytest.mark.slow
def test_twenty_kills_survived_exactly(tiny_corpus, tmp_path):
    _run(tiny_corpus, tmp_path, 20, 1, 24)


@pytest.mark.slow
def test_kills_during_asynchronous_writes_survived_exactly(tiny_corpus, tmp_path):
    """--async-save: the files are written on a background thread while training goes on; kills mid-write (write:N
    fires on that thread), mid-step and at the tracker lose nothing and the end state equals the uninterrupted run."""
    out = _run(tiny_corpus, tmp_path, 4, 5, 10, "--async-save")
    assert "(asynchronous writes)" in out


@pytest.mark.parametrize("flags,named", [
    (["--save-interval", "2"], "--train-iters"),
    (["--train-iters", "4"], "--save-interval"),
    (["--train-iters", "x", "--save-interval", "2"], "--train-iters"),
    (["--train-iters", "4", "--save-interval"], "--save-interval"),
    (["--train-iters", "4", "--save-interval", "2", "--save", "d"], "--save"),
])
def test_bad_pretrain_flags_are_one_line_and_exit_2(tmp_path, flags, named):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fault_inject.py"), "--work-dir",
                        str(tmp_path / "fi"), "--", *flags], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and named in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "fi").exists()  # nothing started
