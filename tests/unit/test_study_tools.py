"""The study's tooling: the token budget from calibration logs (tools/study_budget.py) against the arithmetic
written out, and the report's claim verdicts (tools/study_report.py) on hand-made numbers."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.inprocess import run_cli

sys.path.insert(0, os.path.join(ROOT, "tools"))
import study_budget  # noqa: E402
import study_report  # noqa: E402


def _log(path, tps):
    path.write_text("".join(f" iteration {i:8d}/      12 | consumed tokens: {i * 8192:12d} | tokens/s: {t} |\n"
                            for i, t in zip((4, 8, 12), (tps // 2, tps + 50, tps))))
    return str(path)


def test_budget_cli_fits_the_minutes(tmp_path):
    tps = {"dense": 4000, "moe": 3000, "pr_moe": 2500, "student": 2800}
    logs = [f"{k}={_log(tmp_path / f'{k}.log', v)}" for k, v in tps.items()]
    out = tmp_path / "budget.json"
    r = run_cli("tools/study_budget.py", ["--minutes", "100", "--elapsed-seconds", "600",
                                          "--runs", "dense=2", "moe=2", "pr_moe=1", "student=2", "--kd-fraction", "0.6",
                                          "--tokens-per-iter", "8192", "--calibration", *logs, "--output", str(out)])
    assert r.returncode == 0, r.stderr
    b = json.loads(out.read_text())
    assert b["tokens_per_s"] == {k: float(v) for k, v in tps.items()}  # the last log line of each calibration
    # seconds per token of all runs, the MoS teacher's forward (1/3 of a PR-MoE step) on 60% of its tokens
    per_token = 2 / 4000 + 2 / 3000 + 1 / 2500 + 2 / 2800 + 0.6 / (3 * 2500)
    reserve = study_budget.EVAL_TOKENS * (2 / 12000 + 2 / 9000 + 1 / 7500 + 2 / 8400)
    want = int((6000 - 600 - reserve) / per_token) // 8192 * 8192
    assert b["tokens_per_run"] == want and b["tokens_per_run"] % 8192 == 0
    assert b["planned_minutes"] <= 100 and b["planned_minutes"] > 99  # rounded down by less than one iteration
    bad = subprocess.run(  # the exit-code smoke test of this CLI: a real process
        [sys.executable, "tools/study_budget.py", "--minutes", "0.5", "--runs", "dense=1",
                          "--calibration", logs[0], "--tokens-per-iter", "8192", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --minutes 0.5: nothing left")


def _run(model, seed, loss, total=1.0e6, active=1.0e6):
    return {"model": model, "seed": seed, "val_loss": loss, "total_params": total, "active_params": active}


def test_claim_verdicts_follow_the_issue_targets():
    runs = [_run("dense", 1, 5.00), _run("dense", 2, 5.01), _run("moe", 1, 4.90, 4e6), _run("moe", 2, 4.91, 4e6),
            _run("pr_moe", 1, 4.94, 2.9e6), _run("mos", 1, 4.98), _run("student_no_kd", 1, 5.02)]
    (moe, _, _, ok1), (pr, _, _, ok2), (mos, _, _, ok3) = study_report.claims(runs)
    assert ok1  # gap 0.10 >= max(0.03, 3 x spread 0.01)
    assert ok2  # 4.94 <= 4.905 x 1.01 and 27.5% fewer params
    assert ok3  # 4.98 <= 4.94 x 1.01 and 5.02 - 4.98 > 0.01
    runs[1]["val_loss"] = 5.05  # seed spread 0.05: the 0.12 gap is below 3 x 0.05
    assert not study_report.claims(runs)[0][3]
    runs[4]["total_params"] = 3.5e6  # only 12.5% fewer parameters
    assert not study_report.claims(runs)[1][3]


def test_log_parsing_handles_a_resumed_run(tmp_path):
    log = tmp_path / "train.log"
    line = " iteration {:8d}/       4 | consumed samples: {:10d} | consumed tokens: {:12d} | tokens/s: {} |\n"
    log.write_text(line.format(2, 64, 16384, 900) + " validation loss at iteration 2 | lm loss value: 6.0E+00 |\n"
                   + "exiting at iteration 2 (signal)\n" + line.format(4, 128, 32768, 1000)
                   + " validation loss at iteration 4 | lm loss value: 5.0E+00 |\n"
                   + " validation loss at the end of training (validation set) | lm loss value: 4.9E+00 |\n")
    got = study_report.parse_log(str(log))
    assert got["curve"] == [(16384, 6.0), (32768, 4.9)] and got["val_loss"] == 4.9 and got["tokens"] == 32768
    assert got["tokens_per_s"] == 1000
    with pytest.raises(ValueError, match="MODEL:SEED=DIR"):
        study_report.collect(["dense=somewhere"])
