"""Exact resume as a user runs it: pretrain_gpt.py in separate processes with default flags (dropout 0.1, the MFU
peak measured at start since --peak-flops is not given, a data-loader worker). 8 iterations straight must equal
4 (--exit-interval) + --load + 4, bit for bit: weights, Adam state and every logged loss."""
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron import checkpointing
from tests.conftest import ROOT, tiny_train_argv


def _user_argv(corpus, tmp_path, *extra):
    argv = tiny_train_argv(corpus, tmp_path, *extra)
    i = argv.index("--peak-flops")  # a user does not pass it: the start-up GEMM probe runs
    del argv[i:i + 2]
    argv[argv.index("--num-workers") + 1] = "1"
    argv[argv.index("--log-interval") + 1] = "1"
    return argv


def _run(argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *argv], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"iteration\s+(\d+)/.*?lm loss: (\S+)", r.stdout)}


def _state(root):
    payload, ckpt_dir = checkpointing.load_dense(root)
    experts = {f: torch.load(os.path.join(ckpt_dir, f), weights_only=True)
               for f in sorted(os.listdir(ckpt_dir)) if f.startswith("layer_")}
    return payload, experts


def test_straight_run_equals_exit_save_resume_from_the_command_line(tiny_corpus, tmp_path):
    moe = ("--num-experts", "4", "--topk", "2", "--moe-expert-parallel-size", "1")
    straight = _run(_user_argv(tiny_corpus, tmp_path / "a", "--train-iters", "8", "--save", str(tmp_path / "a"),
                               "--save-interval", "8", *moe))
    first = _run(_user_argv(tiny_corpus, tmp_path / "b", "--train-iters", "8", "--save", str(tmp_path / "b"),
                            "--save-interval", "8", "--exit-interval", "4", *moe))
    second = _run(_user_argv(tiny_corpus, tmp_path / "b", "--train-iters", "8", "--save", str(tmp_path / "b"),
                             "--save-interval", "8", "--load", str(tmp_path / "b"), *moe))
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6, 7, 8]
    assert {**first, **second} == straight  # every logged loss, as printed
    (a, ea), (b, eb) = _state(str(tmp_path / "a")), _state(str(tmp_path / "b"))
    assert a["iteration"] == b["iteration"] == 8
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for name, st in a["optimizer"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"][name][key])), (name, key)
    assert sorted(ea) == sorted(eb) and ea
    for f in ea:
        for k, v in ea[f]["model"].items():
            assert torch.equal(v, eb[f]["model"][k]), (f, k)


@pytest.mark.slow  # three CLI runs (~30 s of CPU, more on a busy machine)
def test_recompute_is_invisible_to_training_and_resumes_exactly(tiny_corpus, tmp_path):
    """--checkpoint-activations (full recompute, MoE layers included, dropout on): 4 iterations + --load + 4 equal
    8 iterations straight without recomputation, every logged loss and every final weight bit for bit."""
    moe = ("--num-experts", "4", "--topk", "2", "--moe-expert-parallel-size", "1")
    common = ("--train-iters", "8", "--save-interval", "8", *moe)
    straight = _run(_user_argv(tiny_corpus, tmp_path / "a", "--save", str(tmp_path / "a"), *common))
    ckpt = str(tmp_path / "b")
    first = _run(_user_argv(tiny_corpus, tmp_path / "b", "--save", ckpt, "--exit-interval", "4",
                            "--checkpoint-activations", *common))
    second = _run(_user_argv(tiny_corpus, tmp_path / "b", "--save", ckpt, "--load", ckpt,
                             "--checkpoint-activations", *common))
    assert {**first, **second} == straight and sorted(straight) == list(range(1, 9))
    (a, ea), (b, eb) = _state(str(tmp_path / "a")), _state(ckpt)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for f in ea:
        for k, v in ea[f]["model"].items():
            assert torch.equal(v, eb[f]["model"][k]), (f, k)
