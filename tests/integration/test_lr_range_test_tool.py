"""tools/lr_range_test.py as a user runs it: a sweep on a tiny model writes the CSV and the PNG, and the
suggested maximum LR (with the OneCycle flags) lies inside the swept range."""
import csv
import os
import re
import sys

import pytest

from tests.conftest import ROOT, tiny_train_argv
from tests.inprocess import run_cli

sys.path.insert(0, os.path.join(ROOT, "tools"))
import lr_range_test  # noqa: E402


def test_range_test_cli_writes_csv_png_and_a_suggestion_in_range(tiny_corpus, tmp_path):
    out = tmp_path / "lrrt"
    # the pasted training command keeps its own length, schedule and save flags: the tool replaces them
    train = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "500", "--save", str(tmp_path / "nope"),
                            "--lr-warmup-iters", "5")
    r = run_cli("tools/lr_range_test.py", ["--steps", "30", "--min-lr", "1e-4", "--max-lr", "1.0", "--planned-iters",
                                           "200", "--output-dir", str(out), "--", *train])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "lr_range_test.csv")))
    assert 2 <= len(rows) <= 30 and float(rows[0]["lr"]) == pytest.approx(1e-4)
    lrs = [float(x["lr"]) for x in rows]
    assert lrs == sorted(lrs)  # the LR rises every step
    assert os.path.getsize(out / "lr_range_test.png") > 1000
    suggested = float(re.search(r"suggested max LR: (\S+)", r.stdout).group(1))
    assert lrs[0] <= suggested <= lrs[-1]
    flags = re.search(r"OneCycle flags: (.*)", r.stdout).group(1)
    assert f"--cycle-max-lr {suggested:.3g}" in flags and "--cycle-first-step-size 90" in flags
    assert not (tmp_path / "nope").exists()  # --save was dropped


def test_suggestion_rule_on_a_known_curve():
    """A loss that falls until LR 0.1 and then blows up: the smoothed minimum lies just past 0.1 (EMA lag) and the
    suggestion is half the LR there."""
    lrs = [1e-4 * (1.0 + i * 0.02) for i in range(200)]  # 1e-4 .. ~4e-4 linear; rescale below
    lrs = [x * 1000 / 4 for x in lrs]  # 0.025 .. ~0.1
    losses = [5.0 - 10 * lr if lr < 0.08 else 5.0 - 0.8 + 200 * (lr - 0.08) for lr in lrs]
    at_min, max_lr, min_lr = lr_range_test.suggest(lrs, losses)
    assert 0.08 <= at_min <= 0.09 and max_lr == pytest.approx(at_min / 2) and min_lr == pytest.approx(max_lr / 10)
    assert not lr_range_test.capped_by_max_lr(losses)
    # a loss still falling at the last step (the study's dense sweep to 3e-2): the suggestion is capped by --max-lr
    assert lr_range_test.capped_by_max_lr([7.0 - 0.01 * i for i in range(60)])
    assert not lr_range_test.capped_by_max_lr([7.0 - 0.01 * i for i in range(50)] + [7.0] * 10)
    # lowest 2 steps before the end of 60 (the dense sweep to 1e-1): inside the last 5%, no turn seen
    assert lr_range_test.capped_by_max_lr([7.0 - 0.01 * i for i in range(58)] + [6.5, 6.6])
    assert lr_range_test.strip_replaced(["--lr", "1", "--seq-length", "8", "--save=/x", "--exit-signal-handler",
                                         "--lr-decay-style", "cosine"]) == ["--seq-length", "8"]
