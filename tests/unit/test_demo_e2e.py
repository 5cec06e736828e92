"""`make demo`'s script end to end on the real corpus with a few iterations (slow: `make test-all`)."""
import os
import subprocess
import sys

import pytest

from megatron.data.data_files import DataFileError, default_data_dir, resolve
from tests.conftest import ROOT


def _have_data():
    try:
        for name in ("corpus", "gpt2-vocab", "gpt2-merges", "lambada", "piqa-valid", "piqa-valid-labels"):
            resolve(name, default_data_dir())
        return True
    except DataFileError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _have_data(), reason="shared data (corpus, GPT-2 BPE, LAMBADA, PIQA) not found")
def test_demo_script_runs_end_to_end(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "demo"), TRAIN_ITERS="10", EVAL_LIMIT="20", EVAL_TASKS="lambada,piqa",
               DATA_DIR=str(default_data_dir()))
    p = subprocess.run(["bash", "examples_moe/demo.sh", "--eval-interval", "5", "--lr-warmup-iters", "2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = p.stdout
    assert "validation loss at the end of training" in out and "moe layer 0: aux" in out
    assert "| lambada |" in out and "| piqa |" in out
    assert os.path.isfile(tmp_path / "demo" / "eval_zeroshot.json")
    # the modern recipe is dropless; the loss curve lies beside the checkpoint; the last line sums the run up
    assert "dropped 0.00%" in out and os.path.isfile(tmp_path / "demo" / "checkpoints" / "loss_curve.png")
    last = out.strip().splitlines()[-1]
    assert last.startswith("demo: validation ppl ") and "expert load max/mean" in last and "sample: " in last
