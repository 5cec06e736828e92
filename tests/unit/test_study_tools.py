"""The study's tooling: the token budget from calibration logs (tools/study_budget.py) against the arithmetic
written out; the token-efficiency ratio, the figures and the claim verdicts (tools/study_report.py) on hand-made
curves; tools/study_claims.py on a synthetic study JSON; active parameters (tools/study_params.py) against a model
that has only the k experts a token uses."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.inprocess import run_cli

sys.path.insert(0, os.path.join(ROOT, "tools"))
import study_budget  # noqa: E402
import study_claims  # noqa: E402
import study_params  # noqa: E402
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
                                          "--tokens-per-iter", "8192", "--val-tokens-per-run", "300000",
                                          "--calibration", *logs, "--output", str(out)])
    assert r.returncode == 0, r.stderr
    b = json.loads(out.read_text())
    assert b["tokens_per_s"] == {k: float(v) for k, v in tps.items()}  # the last log line of each calibration
    # seconds per token of all runs, the MoS teacher's forward (1/3 of a PR-MoE step) on 60% of its tokens
    per_token = 2 / 4000 + 2 / 3000 + 1 / 2500 + 2 / 2800 + 0.6 / (3 * 2500)
    # zero-shot and periodic validation, forward only (1/3 of a training step per token)
    reserve = (study_budget.EVAL_TOKENS + 300000) * (2 / 12000 + 2 / 9000 + 1 / 7500 + 2 / 8400)
    want = int((6000 - 600 - reserve) / per_token) // 8192 * 8192
    assert b["tokens_per_run"] == want and b["tokens_per_run"] % 8192 == 0
    assert b["planned_minutes"] <= 100 and b["planned_minutes"] > 99  # rounded down by less than one iteration
    bad = subprocess.run(  # the exit-code smoke test of this CLI: a real process
        [sys.executable, "tools/study_budget.py", "--minutes", "0.5", "--runs", "dense=1",
                          "--calibration", logs[0], "--tokens-per-iter", "8192", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --minutes 0.5: nothing left")


def test_tokens_to_reach_interpolates_the_first_crossing():
    curve = [(100, 6.0), (200, 5.5), (300, 5.0)]
    t, how = study_report.tokens_to_reach(curve, 5.2)  # 200 + (5.5-5.2)/(5.5-5.0) x 100; abs 1e-9: float rounding
    assert how == "interpolated" and t == pytest.approx(260.0, abs=1e-9)
    assert study_report.tokens_to_reach(curve, 5.5) == (200.0, "interpolated")  # reached exactly at a validation
    assert study_report.tokens_to_reach(curve, 6.5) == (100.0, "at_or_before")  # below target at the first point
    assert study_report.tokens_to_reach(curve, 4.9) == (None, "not_reached")
    bumpy = [(300, 5.4), (100, 6.0), (400, 4.9), (200, 5.1)]  # unsorted; dips below 5.2 at 200, back up at 300
    t, how = study_report.tokens_to_reach(bumpy, 5.2)
    assert how == "interpolated" and t == pytest.approx(100 + 0.8 / 0.9 * 100, abs=1e-9)  # float rounding only


def _run(model, seed, loss, total=1.0e6, active=1.0e6, curve=None, tokens=400):
    return {"model": model, "seed": seed, "val_loss": loss, "total_params": total, "active_params": active,
            "tokens": tokens, "val_curve": curve if curve is not None else [(tokens, loss)], "wall_seconds": 60,
            "val_ppl": math.exp(loss), "tokens_per_s": None, "lambada_acc": None, "lambada_ppl": None,
            "piqa_acc": None, "piqa_acc_norm": None}


def _study(moe3_curve=((100, 5.5), (200, 5.2), (300, 5.0), (400, 4.95))):
    """Dense 5.00/5.02/5.04 (mean 5.02, spread 0.04); MoE 4.80/4.82/4.83 (spread 0.03): gap 0.2033 >= 3 x 0.04."""
    return [_run("dense", 1, 5.00), _run("dense", 2, 5.02), _run("dense", 3, 5.04),
            _run("moe", 1, 4.80, 4e6, curve=[(100, 5.42), (200, 4.92), (300, 4.85), (400, 4.80)]),
            _run("moe", 2, 4.82, 4e6, curve=[(100, 5.30), (200, 5.10), (300, 4.90), (400, 4.82)]),
            _run("moe", 3, 4.83, 4e6, curve=list(moe3_curve)),
            _run("ds_moe", 1, 4.95, 8e6), _run("pr_moe", 1, 4.85, 2.9e6), _run("mos", 1, 4.88, 2.5e6),
            _run("student_no_kd", 1, 5.00, 2.5e6)]


def test_summary_and_claims_on_hand_made_runs():
    runs = _study()
    s = study_report.summarize(runs)
    g, te = s["moe_vs_dense"], s["token_efficiency"]
    assert g["gap"] == pytest.approx(5.02 - 4.8166666, abs=1e-6) and g["larger_spread"] == pytest.approx(0.04)
    assert g["gap_over_spread"] == pytest.approx((5.02 - 4.8166666) / 0.04, abs=1e-4)
    # target 5.02: seed 1 crosses between 100 (5.42) and 200 (4.92): 100 + 0.40/0.50 x 100 = 180 -> 180/400;
    # seed 2 between 200 (5.10) and 300 (4.90): 240 -> 0.6; seed 3 between 200 (5.2) and 300 (5.0): 290 -> 0.725
    assert [x["ratio"] for x in te["per_seed"]] == pytest.approx([0.45, 0.6, 0.725])
    assert te["mean_ratio"] == pytest.approx((0.45 + 0.6 + 0.725) / 3) and te["reached"] == 3
    assert s["pr_moe_vs_moe"]["param_cut"] == pytest.approx(1 - 2.9 / 4)
    assert s["mos_vs_teacher"]["loss_rel"] == pytest.approx(4.88 / 4.85 - 1)
    verdicts = {c["claim"].split()[0] + str(i): c["pass"] for i, c in enumerate(study_report.claims(s))}
    # gap 0.203 >= max(0.05, 0.12): PASS; ratio 0.592 <= 0.6: PASS; PR-MoE +0.69%, 27.5% fewer: PASS;
    # MoS +0.62% of its teacher: PASS
    assert list(verdicts.values()) == [True, True, True, True]
    runs[2]["val_loss"] = 5.10  # dense spread 0.10: the gap 0.2366 is below 3 x 0.10
    assert [c["pass"] for c in study_report.claims(study_report.summarize(runs))][0] is False


def test_token_efficiency_not_reached_is_a_miss():
    runs = _study(moe3_curve=[(100, 5.5), (200, 5.3), (300, 5.1), (400, 5.03)])  # never at or below 5.02
    runs[5]["val_loss"] = 5.03
    te = study_report.summarize(runs)["token_efficiency"]
    assert [x["how"] for x in te["per_seed"]] == ["interpolated", "interpolated", "not_reached"]
    assert te["mean_ratio"] is None and te["reached"] == 2
    assert study_report.ratio_text(te["per_seed"][2]) == "not reached"
    claim = study_report.claims(study_report.summarize(runs))[1]
    assert claim["pass"] is False and "seed 3 not reached" in claim["measured"]


def test_study_claims_prints_figures_and_verdicts(tmp_path, capsys):
    runs = _study()
    runs[7]["total_params"] = 3.5e6  # PR-MoE only 12.5% smaller than MoE: a MISS
    summary = study_report.summarize(runs)
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"version": 2, "runs": runs, "summary": summary,
                                "claims": study_report.claims(summary)}))
    assert study_claims.main([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"study v2 ({path})"
    assert "  dense: final val loss 5.0000, 5.0200, 5.0400; mean 5.0200; seed spread 0.0400 (3 seed(s))" in out
    assert "  token-efficiency ratio, MoE seed 2: 0.600" in out
    assert any(l.startswith("  MoE - dense gap: 0.2033 nats; larger seed spread 0.0400; gap / larger spread 5.08")
               for l in out)
    assert "  PR-MoE vs MoE: loss +0.69%, parameters -12.50% (3.50M vs 4.00M)" in out
    verdicts = [l.split()[0] for l in out if l.startswith(("PASS", "MISS"))]
    assert verdicts == ["PASS", "PASS", "MISS", "PASS"] and out[-1] == "3 of 4 targets met"
    # a v1-style JSON (runs only) gives the same figures, computed from the runs
    path.write_text(json.dumps({"runs": runs}))
    assert study_claims.main([str(path)]) == 0
    out1 = capsys.readouterr().out.splitlines()
    assert out1[0] == f"study v1 ({path})" and out1[-1] == "3 of 4 targets met"


def test_study_claims_unreadable_json_exits_2(tmp_path, capsys):
    bad = tmp_path / "study.json"
    bad.write_text("{not json")
    assert study_claims.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: unreadable study JSON (JSONDecodeError")
    bad.write_text(json.dumps({"version": 2}))  # no runs, no summary
    assert study_claims.main([str(bad)]) == 2


def test_report_markdown_json_fields_and_plot(tmp_path):
    runs = _study()
    summary = study_report.summarize(runs)
    verdicts = study_report.claims(summary)
    md = study_report.markdown(runs, summary, verdicts, "# header")
    assert "| MoE (modern) | 1 | 4.00M | 1.00M | 400 | 4.8000 | 121.5 | n/a | 1.0 |" in md  # wall-clock 60 s
    assert "| dense | 3 | 5.0000, 5.0200, 5.0400 | 5.0200 | 0.0400 |" in md  # per arm: losses, mean, spread
    assert "seed 1 0.450, seed 2 0.600, seed 3 0.725; mean 0.592." in md
    assert md.count("| PASS |") == 4
    assert set(summary) == {"arms", "moe_vs_dense", "token_efficiency", "gap_curve", "ds_moe_vs_moe",
                            "pr_moe_vs_moe", "mos_vs_teacher"}
    png = tmp_path / "p.png"
    study_report.plot(runs, summary, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_log_parsing_handles_a_resumed_run(tmp_path):
    log = tmp_path / "train.log"
    line = " iteration {:8d}/       4 | consumed samples: {:10d} | consumed tokens: {:12d} | tokens/s: {} |\n"
    moe = "   moe layer 0: aux 0.0100 | tokens/expert min 1 max 9 cv 0.500 | dropped {}%\n"
    log.write_text(line.format(2, 64, 16384, 900) + moe.format("12.50")
                   + " validation loss at iteration 2 | lm loss value: 6.0E+00 |\n"
                   + "exiting at iteration 2 (signal)\n" + line.format(4, 128, 32768, 1000) + moe.format("0.00")
                   + " validation loss at iteration 4 | lm loss value: 5.0E+00 |\n"
                   + " validation loss at the end of training (validation set) | lm loss value: 4.9E+00 |\n")
    got = study_report.parse_log(str(log))
    assert got["curve"] == [(16384, 6.0), (32768, 4.9)] and got["val_loss"] == 4.9 and got["tokens"] == 32768
    assert got["tokens_per_s"] == 1000 and got["dropped_pct"] == [(2, 12.5), (4, 0.0)]
    (tmp_path / "wall_seconds").write_text("30\n45\n")
    assert study_report.wall_seconds(str(tmp_path / "wall_seconds")) == 75
    with pytest.raises(ValueError, match="MODEL:SEED=DIR"):
        study_report.collect(["dense=somewhere"])


def test_active_params_equal_a_model_with_only_k_experts():
    """Active parameters of top-2 of 4 experts = all parameters of the same model with exactly 2 experts (every
    expert used), an independent count."""
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from moe.config import MoEConfig

    mcfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, seq_length=8,
                       max_position_embeddings=8, padded_vocab_size=64)
    total4, active4 = study_params.param_counts(GPTModel(mcfg, MoEConfig(num_experts=(4,), topk=2)), 2)
    total2, active2 = study_params.param_counts(GPTModel(mcfg, MoEConfig(num_experts=(2,), topk=2)), 2)
    router_extra = 2 * 16  # the router's weight is [E, D]: 2 more experts = 32 more router weights (no bias)
    assert total2 == active2 and active4 == total2 + router_extra
    assert total4 - active4 == 2 * (2 * 16 * 32 + 32 + 16)  # two unused experts of fc1 [16x32]+32, fc2 [32x16]+16


def test_balance_bound_from_the_logged_moe_lines(tmp_path):
    """max/mean per layer with mean = tokens x top-k / experts, from iteration 20 on; one iteration over 2.0."""
    line = " iteration {:8d}/      30 | consumed samples: {:10d} | consumed tokens: {:12d} | tokens/s: 100 |\n"
    moe = "   moe layer {}: aux 0.0100 | tokens/expert min 1 max {} cv 0.500 | dropped {}%\n"
    log = tmp_path / "train.log"
    log.write_text("".join(line.format(it, it, it * 64) + moe.format(0, m0, "0.00") + moe.format(1, m1, d1)
                           for it, m0, m1, d1 in ((10, 60, 60, "9.00"), (20, 30, 16, "5.00"), (21, 20, 17, "0.00"))))
    parsed = study_report.parse_log(str(log))
    assert parsed["tokens_per_iter"] == 64 and parsed["load"][1] == (20, [(30, 0.0), (16, 5.0)])
    layers = [(4, 1), (16, 2)]  # means 64 x 1 / 4 = 16 and 64 x 2 / 16 = 8
    got = study_report.balance(parsed["load"], parsed["tokens_per_iter"], layers)
    # iteration 10 (3.75, 9% dropped) is before the bound applies; 20: 1.875 and 2.0 with 5% dropped: within;
    # 21: 17 / 8 = 2.125: outside
    assert got == {"from_iteration": 20, "iterations": 2, "worst_max_over_mean": 2.125, "worst_dropped_pct": 5.0,
                   "over": 1, "first_over": 21}
    assert study_report.balance(parsed["load"], 64, layers, start=22) is None
    with pytest.raises(ValueError, match="2 layers, the checkpoint 1"):
        study_report.balance(parsed["load"], 64, [(4, 1)])
    runs = _study()
    for r, over in zip(runs[3:], (0, 0, 0, 5)):  # MoE seeds 1-3 within, the DeepSpeed top-1 arm outside
        r["balance"] = {**got, "over": over, "worst_max_over_mean": 1.5 + over}
    s = study_report.summarize(runs)
    claim = study_report.claims(s)[-1]
    assert claim["claim"].startswith("Routing balanced") and claim["pass"] is True  # ds_moe is not judged
    assert "0 of 6 iterations outside the bound over 3 runs" in claim["measured"]
    runs[4]["balance"]["over"] = 2
    claim = study_report.claims(study_report.summarize(runs))[-1]
    assert claim["pass"] is False and "2 of 6" in claim["measured"]
    assert "| MoE (DeepSpeed top-1) | 1 | 2 | 6.50 | 5.00% | 5 | 21 |" in study_report.markdown(
        runs, study_report.summarize(runs), [], "# h")


def test_gap_curve_and_dense_equivalent_tokens():
    """Dense mean curve 6.0/5.5/5.0 at 100/200/300; MoE mean 5.75 at 100 (dense gets there at 150: 1.5x), 5.25 at
    200 (dense at 250: 1.25x), 4.9 at 300 (dense never: None)."""
    runs = [_run("dense", 1, 5.0, curve=[(100, 6.1), (200, 5.6), (300, 5.1)]),
            _run("dense", 2, 5.0, curve=[(100, 5.9), (200, 5.4), (300, 4.9)]),
            _run("moe", 1, 4.9, curve=[(100, 5.75), (200, 5.3), (300, 4.9), (400, 4.8)]),
            _run("moe", 2, 4.9, curve=[(100, 5.75), (200, 5.2), (300, 4.9)])]
    got = study_report.gap_curve(runs)
    assert [p["tokens"] for p in got] == [100, 200, 300]  # 400: one MoE seed only
    assert [p["gap"] for p in got] == pytest.approx([0.25, 0.25, 0.1])
    assert [p["dense_equivalent"] for p in got[:2]] == pytest.approx([1.5, 1.25]) and got[2]["dense_equivalent"] is None
    md = study_report.markdown(runs, study_report.summarize(runs), [], "# h")
    assert "| 100 | 6.0000 | 5.7500 | +0.2500 | 1.50x |" in md and "| 300 | 5.0000 | 4.9000 | +0.1000 | n/a |" in md


def test_report_appends_the_hand_written_notes(tmp_path, monkeypatch, capsys):
    """--notes: the study's reading (docs/study_notes.md) follows the generated report, so a rerun keeps it; a
    missing notes file is one line and exit 2, nothing written."""
    monkeypatch.setattr(study_report, "collect", lambda specs: _study())
    notes = tmp_path / "notes.md"
    notes.write_text("## Reading the results\n\nhand-written\n")
    out = tmp_path / "study.md"
    assert study_report.main(["--runs", "x", "--output", str(out), "--notes", str(notes)]) == 0
    text = out.read_text()
    assert text.index("## Issue 28's targets") < text.index("## Reading the results") and text.endswith("hand-written\n")
    out.unlink()
    capsys.readouterr()
    assert study_report.main(["--runs", "x", "--output", str(out), "--notes", str(tmp_path / "none.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--notes" in err and not out.exists()


def test_paired_gap_by_seed():
    """Dense 5.00/5.02/5.04 and MoE 4.80/4.82/4.83 of the same seeds: paired gaps 0.20, 0.20, 0.21 (spread 0.01),
    in the summary, the claim's figures and the report; a seed only one arm ran is left out."""
    runs = _study() + [_run("dense", 9, 6.0)]
    p = study_report.summarize(runs)["moe_vs_dense"]["paired"]
    assert [x["seed"] for x in p["per_seed"]] == [1, 2, 3]
    assert [x["gap"] for x in p["per_seed"]] == pytest.approx([0.20, 0.20, 0.21])
    assert p["spread"] == pytest.approx(0.01) and p["mean"] == pytest.approx(0.61 / 3)
    s = study_report.summarize(_study())
    assert "paired by seed (same data order): gaps 0.200, 0.200, 0.210, spread 0.010" in study_report.claims(s)[0][
        "measured"]
    assert "dense − MoE = 0.2000 (seed 1), 0.2000 (seed 2), 0.2100 (seed 3)" in study_report.markdown(
        _study(), s, [], "# h")
    assert study_report.paired_gaps([_run("dense", 1, 5.0)]) is None
