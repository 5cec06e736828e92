"""The user flows on the GPU, through pretrain_gpt.py's main in-process on the tiny corpus: --bf16 MoE training
that saves a teacher, MoS from that MoE teacher under --bf16 (issue 23 finding 1), and --bf16 training with the
expert optimizer state offloaded to NVMe."""
import re

import torch

from megatron.training import pretrain
from tests.conftest import tiny_train_argv

MOE = ["--num-experts", "4", "--expert-interval", "2", "--topk", "2", "--log-interval", "2", "--eval-iters", "0",
       "--bf16"]


def _losses(out):
    return [float(x) for x in re.findall(r"lm loss: (\S+)", out)]


def test_bf16_moe_teacher_then_mos_student_then_offloaded_training(tiny_corpus, tmp_path, capsys):
    teacher = str(tmp_path / "teacher")
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "4", "--save", teacher))
    out = capsys.readouterr().out
    assert len(_losses(out)) == 2 and all(l == l for l in _losses(out)) and "MFU" in out
    student = tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "4", "--mos", "--load-teacher", teacher,
                              "--num-layers-teacher", "2", "--num-experts-teacher", "4", "--num-layers", "2")
    r = pretrain(student)
    out = capsys.readouterr().out
    assert r["state"].device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "kd loss" in out and all(l == l for l in _losses(out))
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "4", "--moe-offload-optimizer", "nvme",
                                 "--moe-offload-dir", str(tmp_path / "off")))
    r["state"].optimizer.close()
    out = capsys.readouterr().out
    assert "offload:" in out and all(l == l for l in _losses(out))
    assert not torch.cuda.is_available() or torch.cuda.max_memory_allocated() > 0
