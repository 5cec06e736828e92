"""Checksums and --load-fallback under torchrun, EP=2 (gloo): the ranks read different expert files, so a file only
rank 1 reads decides for both. Without the flag both ranks stop with the same line naming that file; with it both
load the previous checkpoint, train on and save again (the refused directory kept as .corrupt)."""
import os
import subprocess
import sys

import pytest

from megatron import checkpointing
from tests.conftest import ROOT, tiny_train_argv

MOE = ["--num-experts", "4", "--expert-interval", "2", "--moe-expert-parallel-size", "2", "--topk", "2",
       "--micro-batch-size", "2", "--global-batch-size", "8"]


def _torchrun(flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "pretrain_gpt.py"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_fallback_agreed_by_both_ranks(tiny_corpus, tmp_path):
    ck = str(tmp_path / "ck")
    flags = tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--save", ck, "--save-interval", "2")
    r = _torchrun(flags + ["--train-iters", "4"])
    assert r.returncode == 0, r.stderr[-3000:]
    d4 = checkpointing.iter_dir(ck, 4)
    assert len(checkpointing.read_manifest(d4)) == 5  # every rank's files: the dense file and 4 experts
    bad = checkpointing.expert_path(d4, 0, 3)  # EP rank 1 holds experts 2 and 3: only rank 1 reads this file
    data = bytearray(open(bad, "rb").read())
    data[len(data) // 3] ^= 0xFF
    open(bad, "wb").write(bytes(data))

    r = _torchrun(flags + ["--train-iters", "6", "--override-opt_param-scheduler", "--load", ck])
    lines = [ln.split("]:", 1)[-1].strip() for ln in r.stderr.splitlines() if "error: " in ln]
    lines = [ln[ln.index("error: "):] for ln in lines]
    assert r.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], r.stderr[-3000:]
    assert bad in lines[0] and "--load-fallback would load iteration 2" in lines[0]
    # torchrun itself prints a traceback (ChildFailedError) when a worker exits non-zero; none comes from our code
    assert f'{os.sep}megatron{os.sep}' not in "".join(ln for ln in r.stderr.splitlines() if ln.strip().startswith("File"))

    r = _torchrun(flags + ["--train-iters", "6", "--override-opt_param-scheduler", "--load", ck, "--load-fallback"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("--load-fallback: ") == 1 and "loaded iteration 2" in out, out[-3000:]
    assert "loaded checkpoint" in out and "at iteration 2" in out
    assert os.path.isdir(d4 + ".corrupt") and checkpointing.read_tracker(ck) == 6
    for d in (checkpointing.iter_dir(ck, 4), checkpointing.iter_dir(ck, 6)):  # saved again, and they verify
        assert checkpointing.checkpoint_complete(d)
        for rel in checkpointing.read_manifest(d):
            checkpointing.load_checkpoint_file(d, os.path.join(d, rel))
