#!/usr/bin/env python
"""Collect study v2 (examples_moe/run_study.sh) into docs/study.md, docs/study.json and a plot of validation loss
against training tokens, and judge it against issue 28's targets.

    python tools/study_report.py --runs dense:1234=outputs/study/dense_s1234 moe:1234=... ds_moe:1234=... \
        pr_moe:1234=... mos:1234=... student_no_kd:1234=... --output docs/study.md --json docs/study.json \
        --plot docs/study_val_loss.png

Each run directory holds `train.log` (pretrain_gpt.py's output, appended across resumes), `checkpoints/`,
`wall_seconds` (one line per invocation of pretrain_gpt.py) and `eval_zeroshot.json`. MODEL is one of MODELS.

Token-efficiency ratio (per MoE seed): the training tokens at which the seed's validation loss first reaches the
dense seeds' mean final loss, found by linear interpolation between the two validations around the crossing,
divided by dense's token budget. Every run is validated on the same held-out batches at the same iterations. A seed
already below the target at its first validation has no point before it to interpolate from: its ratio is reported
as an upper bound (tokens of that validation). A seed that never reaches it is "not reached" (no ratio).
"""
import argparse
import json
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_params  # noqa: E402

MODELS = ("dense", "moe", "ds_moe", "pr_moe", "mos", "student_no_kd")
LABELS = {"dense": "dense", "moe": "MoE (modern)", "ds_moe": "MoE (DeepSpeed top-1)", "pr_moe": "PR-MoE",
          "mos": "MoS student (staged KD)", "student_no_kd": "student, no KD"}
VAL_RE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")
END_RE = re.compile(r"validation loss at the end of training \(validation set\) \| lm loss value: ([0-9.E+-]+)")
LOG_RE = re.compile(r" iteration +(\d+)/ *\d+ .*?consumed tokens: +(\d+) .*?tokens/s: (\d+)")
DROP_RE = re.compile(r"moe layer \d+: .*?dropped ([0-9.]+)%")
LOAD_RE = re.compile(r"moe layer \d+: aux \S+ \| tokens/expert min \d+ max (\d+) cv \S+ \| dropped ([0-9.]+)%")
# issue 28's routing-balance bound, checked on every logged iteration from BALANCE_FROM on (run_study.sh logs every
# iteration): tokens/expert max/mean <= MAX_OVER_MEAN and dropped <= MAX_DROPPED_PCT in every MoE layer
BALANCE_FROM, MAX_OVER_MEAN, MAX_DROPPED_PCT = 20, 2.0, 5.0
BALANCED_RECIPE = ("moe", "pr_moe", "mos", "student_no_kd")  # the runs in the modern routing recipe

# issue 28's targets
TARGETS = {
    "gap_nats": 0.05,  # MoE below dense by at least this many nats ...
    "gap_spread_factor": 3.0,  # ... and by at least this many times the larger seed spread (max - min)
    "token_efficiency_ratio": 0.6,  # mean tokens-to-dense-loss / dense budget at most this
    "pr_moe_loss_rel": 0.01,  # PR-MoE's loss at most 1% above MoE's mean ...
    "pr_moe_param_cut": 0.25,  # ... with at least 25% fewer total parameters
    "mos_loss_rel": 0.01,  # MoS student's loss at most 1% above its teacher's
}


def parse_log(path):
    """{curve: [(tokens, val loss)], val_loss, tokens, tokens_per_s, dropped_pct: [(iteration, max over layers)]}
    from a (possibly resumed) training log."""
    text = open(path).read()
    logged = [(int(i), int(c), int(t)) for i, c, t in LOG_RE.findall(text)]
    per_iter = logged[0][1] // logged[0][0] if logged else 0
    curve = {int(i) * per_iter: float(v) for i, v in VAL_RE.findall(text)}  # a resumed run repeats no iteration
    end = END_RE.findall(text)
    tokens = max((c for _, c, _ in logged), default=0)
    if end:
        curve[tokens] = float(end[-1])
    tok_s = [t for _, _, t in logged]
    dropped, load = [], {}
    for block in re.split(r"(?= iteration +\d+/)", text):  # the MoE lines follow their iteration's log line
        m = LOG_RE.match(block)
        found = [float(d) for d in DROP_RE.findall(block)]
        if m and found:
            dropped.append((int(m.group(1)), max(found)))
            load[int(m.group(1))] = [(int(mx), float(d)) for mx, d in LOAD_RE.findall(block)]
    return {"curve": sorted(curve.items()), "val_loss": float(end[-1]) if end else float("nan"), "tokens": tokens,
            "tokens_per_s": statistics.median(tok_s[1:] or tok_s) if tok_s else float("nan"),
            "dropped_pct": dropped, "load": sorted(load.items()), "tokens_per_iter": per_iter}


def balance(load, tokens_per_iter, layers, start=BALANCE_FROM):
    """The routing-balance bound over the logged iterations >= start: load [(iteration, [(max tokens/expert,
    dropped %) per MoE layer])] from parse_log, layers [(experts, top-k) per MoE layer]; an expert's mean load is
    the iteration's routed pairs / experts = tokens_per_iter x top-k / experts (one process: the log's counts are
    the whole global batch's). {iterations, worst_max_over_mean, worst_dropped_pct, over: iterations outside the
    bound, first_over} or None without MoE lines."""
    rows = [(it, per) for it, per in load if it >= start and per]
    if not rows or not layers:
        return None
    if any(len(per) != len(layers) for _, per in rows):
        raise ValueError(f"the log has MoE lines for {len(rows[0][1])} layers, the checkpoint {len(layers)} MoE layers")
    worst_ratio, worst_drop, over = 0.0, 0.0, []
    for it, per in rows:
        ratios = [mx / (tokens_per_iter * k / e) for (mx, _), (e, k) in zip(per, layers)]
        drop = max(d for _, d in per)
        worst_ratio, worst_drop = max(worst_ratio, max(ratios)), max(worst_drop, drop)
        if max(ratios) > MAX_OVER_MEAN or drop > MAX_DROPPED_PCT:
            over.append(it)
    return {"from_iteration": start, "iterations": len(rows), "worst_max_over_mean": worst_ratio,
            "worst_dropped_pct": worst_drop, "over": len(over), "first_over": over[0] if over else None}


def wall_seconds(path):
    """Seconds of pretrain_gpt.py over every invocation (run_study.sh appends one line per invocation)."""
    if not os.path.isfile(path):
        return None
    return sum(int(x) for x in open(path).read().split())


def eval_metrics(path):
    if not os.path.isfile(path):
        return {}
    data = json.load(open(path))
    return {(r.get("task"), r.get("metric")): r.get("value") for r in data.get("results", [])}


def collect(specs):
    runs = []
    for spec in specs:
        m = re.fullmatch(r"(\w+):(\d+)=(.+)", spec)
        if not m or m.group(1) not in MODELS:
            raise ValueError(f"--runs {spec!r}: expected MODEL:SEED=DIR with MODEL one of {', '.join(MODELS)}")
        model, seed, d = m.group(1), int(m.group(2)), m.group(3)
        log = parse_log(os.path.join(d, "train.log"))
        total, active, layers = study_params.from_checkpoint(os.path.join(d, "checkpoints"), with_routers=True)
        ev = eval_metrics(os.path.join(d, "eval_zeroshot.json"))
        runs.append({"model": model, "seed": seed, "val_loss": log["val_loss"],
                     "val_ppl": math.exp(min(log["val_loss"], 30.0)), "tokens": log["tokens"],
                     "total_params": total, "active_params": active, "tokens_per_s": log["tokens_per_s"],
                     "wall_seconds": wall_seconds(os.path.join(d, "wall_seconds")),
                     "dropped_pct": log["dropped_pct"],
                     "balance": balance(log["load"], log["tokens_per_iter"], layers),
                     "lambada_acc": ev.get(("lambada", "acc")), "lambada_ppl": ev.get(("lambada", "ppl")),
                     "piqa_acc": ev.get(("piqa", "acc")), "piqa_acc_norm": ev.get(("piqa", "acc_norm")),
                     "val_curve": log["curve"], "dir": d})
    return runs


def tokens_to_reach(curve, target):
    """(tokens, how) at which `curve` [(tokens, loss)] first reaches loss <= target: 'interpolated' between the
    validations around the crossing, 'at_or_before' when the first validation is already at or below it (no earlier
    point), (None, 'not_reached') when no validation reaches it."""
    pts = sorted(curve)
    for i, (t, v) in enumerate(pts):
        if v <= target:
            if i == 0:
                return float(t), "at_or_before"
            t0, v0 = pts[i - 1]
            return t0 + (v0 - target) / (v0 - v) * (t - t0), "interpolated"  # v0 > target >= v
    return None, "not_reached"


def token_efficiency(runs):
    """Each modern-MoE seed's tokens to reach the dense seeds' mean final loss, / dense's budget; and their mean
    (None unless every seed reached it)."""
    dense, moe = _by(runs, "dense"), _by(runs, "moe")
    if not dense or not moe:
        return None
    target = statistics.mean(r["val_loss"] for r in dense)
    budget = statistics.mean(r["tokens"] for r in dense)
    per_seed = []
    for r in moe:
        t, how = tokens_to_reach(r["val_curve"], target)
        per_seed.append({"seed": r["seed"], "tokens": t, "how": how,
                         "ratio": None if t is None else t / budget})
    ratios = [s["ratio"] for s in per_seed]
    return {"target_loss": target, "dense_tokens": budget, "per_seed": per_seed,
            "mean_ratio": statistics.mean(ratios) if None not in ratios else None,
            "reached": sum(x is not None for x in ratios), "of": len(ratios)}


def mean_curve(rs):
    """[(tokens, mean loss)] over the token counts every run in rs validated at (they share the iterations)."""
    common = set.intersection(*(set(t for t, _ in r["val_curve"]) for r in rs)) if rs else set()
    return [(t, statistics.mean(dict(r["val_curve"])[t] for r in rs)) for t in sorted(common)]


def gap_curve(runs):
    """The MoE - dense gap along training: at each validation every dense and MoE seed shares, [{tokens, dense, moe
    (seed means), gap, dense_equivalent}]; dense_equivalent = the tokens dense (mean curve) needs to reach the MoE's
    mean loss there / those tokens (> 1: the MoE is worth that many dense tokens; the token-efficiency ratio's
    inverse at the end), None when dense never gets there."""
    dense, moe = mean_curve(_by(runs, "dense")), dict(mean_curve(_by(runs, "moe")))
    out = []
    for t, d in dense:
        if t in moe:
            reach, how = tokens_to_reach(dense, moe[t])
            out.append({"tokens": t, "dense": d, "moe": moe[t], "gap": d - moe[t],
                        "dense_equivalent": None if reach is None or how == "at_or_before" else reach / t})
    return out


def paired_gaps(runs):
    """Dense minus MoE per seed, for the seeds both arms ran: --seed sets the initialisation and the data order
    (the same training samples in the same order for both arms of a seed), so the seed-to-seed variation common
    to both arms cancels in the paired gap. {per_seed: [{seed, gap}], mean, spread (max - min)} or None."""
    dense = {r["seed"]: r["val_loss"] for r in _by(runs, "dense")}
    moe = {r["seed"]: r["val_loss"] for r in _by(runs, "moe")}
    seeds = sorted(set(dense) & set(moe))
    if not seeds:
        return None
    gaps = [dense[s] - moe[s] for s in seeds]
    return {"per_seed": [{"seed": s, "gap": g} for s, g in zip(seeds, gaps)], "mean": statistics.mean(gaps),
            "spread": max(gaps) - min(gaps) if len(gaps) > 1 else None}


def _by(runs, model):
    return [r for r in runs if r["model"] == model]


def _arm(rs):
    losses = [r["val_loss"] for r in rs]
    walls = [r.get("wall_seconds") for r in rs]
    return {"seeds": [r["seed"] for r in rs], "val_loss": losses, "mean": statistics.mean(losses),
            "spread": max(losses) - min(losses) if len(losses) > 1 else None,
            "total_params": rs[0]["total_params"], "active_params": rs[0]["active_params"],
            "wall_seconds": walls}


def summarize(runs):
    """The study's figures: per arm (losses, mean, seed spread), the MoE-dense gap and gap / larger spread, the
    token-efficiency ratio, DeepSpeed top-1 vs modern MoE, PR-MoE vs MoE, MoS vs its teacher."""
    arms = {m: _arm(_by(runs, m)) for m in MODELS if _by(runs, m)}
    out = {"arms": arms}
    if "dense" in arms and "moe" in arms:
        d, m = arms["dense"], arms["moe"]
        spreads = [s for s in (d["spread"], m["spread"]) if s is not None]
        gap = d["mean"] - m["mean"]
        larger = max(spreads) if len(spreads) == 2 else None  # both arms need >= 2 seeds
        out["moe_vs_dense"] = {"dense_mean": d["mean"], "moe_mean": m["mean"], "gap": gap,
                               "dense_spread": d["spread"], "moe_spread": m["spread"], "larger_spread": larger,
                               "gap_over_spread": gap / larger if larger else None,
                               "paired": paired_gaps(runs)}
        out["token_efficiency"] = token_efficiency(runs)
        out["gap_curve"] = gap_curve(runs)
    if "ds_moe" in arms and "moe" in arms:
        ds = arms["ds_moe"]["mean"]
        out["ds_moe_vs_moe"] = {"ds_moe": ds, "moe_mean": arms["moe"]["mean"], "diff": ds - arms["moe"]["mean"]}
    if "pr_moe" in arms and "moe" in arms:
        pr, moe = arms["pr_moe"], arms["moe"]
        out["pr_moe_vs_moe"] = {"pr_moe": pr["mean"], "moe_mean": moe["mean"],
                                "loss_rel": pr["mean"] / moe["mean"] - 1, "pr_moe_params": pr["total_params"],
                                "moe_params": moe["total_params"],
                                "param_cut": 1 - pr["total_params"] / moe["total_params"]}
    checked = [r for r in runs if r.get("balance")]
    if checked:
        out["balance"] = [{"model": r["model"], "seed": r["seed"], **r["balance"]} for r in checked]
    if "mos" in arms and "pr_moe" in arms:
        mos, teacher = arms["mos"]["mean"], arms["pr_moe"]["mean"]
        no_kd = arms["student_no_kd"]["mean"] if "student_no_kd" in arms else None
        out["mos_vs_teacher"] = {"mos": mos, "teacher": teacher, "loss_rel": mos / teacher - 1, "no_kd": no_kd,
                                 "mos_minus_no_kd": None if no_kd is None else mos - no_kd}
    return out


def _f(v, fmt="%.4f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt % v


def ratio_text(s):
    """'0.412', '<= 0.062' (reached at or before the first validation) or 'not reached'."""
    if s["ratio"] is None:
        return "not reached"
    return ("<= " if s["how"] == "at_or_before" else "") + f"{s['ratio']:.3f}"


def paired_text(p):
    """'; paired by seed (same data order): gaps 0.161, 0.169, spread 0.008' or ''."""
    if not p:
        return ""
    gaps = ", ".join("%.3f" % x["gap"] for x in p["per_seed"])
    return f"; paired by seed (same data order): gaps {gaps}, spread {_f(p['spread'], '%.3f')}"


def claims(summary, targets=TARGETS):
    """[{claim, target, measured, pass}] for issue 28's targets; a figure that cannot be computed is a miss."""
    out = []
    g = summary.get("moe_vs_dense")
    if g:
        need = (max(targets["gap_nats"], targets["gap_spread_factor"] * g["larger_spread"])
                if g["larger_spread"] is not None else None)
        out.append({"claim": "MoE below dense at equal active parameters and tokens",
                    "target": f">= {targets['gap_nats']} nats and >= {targets['gap_spread_factor']:g} x the larger "
                              f"seed spread",
                    "measured": f"gap {g['gap']:.4f} (dense {g['dense_mean']:.4f} - MoE {g['moe_mean']:.4f}); "
                                f"spreads dense {_f(g['dense_spread'])}, MoE {_f(g['moe_spread'])}; gap/spread "
                                f"{_f(g['gap_over_spread'], '%.2f')}" + paired_text(g.get("paired")),
                    "pass": need is not None and g["gap"] >= need})
    te = summary.get("token_efficiency")
    if te:
        seeds = ", ".join(f"seed {s['seed']} {ratio_text(s)}" for s in te["per_seed"])
        out.append({"claim": "MoE reaches dense's final loss with fewer tokens",
                    "target": f"token-efficiency ratio <= {targets['token_efficiency_ratio']} (mean over seeds)",
                    "measured": f"mean {_f(te['mean_ratio'], '%.3f')} ({seeds}; {te['reached']} of {te['of']} "
                                f"reached {te['target_loss']:.4f})",
                    "pass": te["mean_ratio"] is not None and te["mean_ratio"] <= targets["token_efficiency_ratio"]})
    pr = summary.get("pr_moe_vs_moe")
    if pr:
        out.append({"claim": "PR-MoE matches MoE with fewer parameters",
                    "target": f"loss within {100 * targets['pr_moe_loss_rel']:g}% of MoE, >= "
                              f"{100 * targets['pr_moe_param_cut']:g}% fewer total parameters",
                    "measured": f"{pr['pr_moe']:.4f} vs {pr['moe_mean']:.4f} ({100 * pr['loss_rel']:+.2f}%), "
                                f"{100 * pr['param_cut']:.1f}% fewer ({pr['pr_moe_params'] / 1e6:.2f}M vs "
                                f"{pr['moe_params'] / 1e6:.2f}M)",
                    "pass": pr["loss_rel"] <= targets["pr_moe_loss_rel"]
                    and pr["param_cut"] >= targets["pr_moe_param_cut"]})
    mos = summary.get("mos_vs_teacher")
    if mos:
        no_kd = "" if mos["no_kd"] is None else f"; no-KD student {mos['no_kd']:.4f}"
        out.append({"claim": "MoS student keeps its PR-MoE teacher's quality",
                    "target": f"within {100 * targets['mos_loss_rel']:g}% of the teacher",
                    "measured": f"{mos['mos']:.4f} vs teacher {mos['teacher']:.4f} ({100 * mos['loss_rel']:+.2f}%)"
                                f"{no_kd}",
                    "pass": mos["loss_rel"] <= targets["mos_loss_rel"]})
    modern = [b for b in summary.get("balance", []) if b["model"] in BALANCED_RECIPE]
    if modern:
        worst = max(modern, key=lambda b: b["worst_max_over_mean"])
        out.append({"claim": "Routing balanced from iteration 20 in the modern recipe (MoE, PR-MoE, MoS, no-KD "
                             "student)",
                    "target": f"every MoE layer, every logged iteration >= {BALANCE_FROM}: tokens/expert max/mean <= "
                              f"{MAX_OVER_MEAN:g}, dropped <= {MAX_DROPPED_PCT:g}%",
                    "measured": f"worst max/mean {worst['worst_max_over_mean']:.2f} ({LABELS[worst['model']]} seed "
                                f"{worst['seed']}), worst dropped "
                                f"{max(b['worst_dropped_pct'] for b in modern):.2f}%; "
                                f"{sum(b['over'] for b in modern)} of {sum(b['iterations'] for b in modern)} "
                                f"iterations outside the bound over {len(modern)} runs",
                    "pass": all(b["over"] == 0 for b in modern)})
    return out


def markdown(runs, summary, verdicts, header):
    lines = [header, "", "## Runs", "", "| model | seed | total params | active params/token | train tokens | "
             "val loss | val ppl | tokens/s | wall-clock (min) | LAMBADA acc | LAMBADA ppl | PIQA acc | PIQA acc_norm |",
             "|---" * 13 + "|"]
    for r in runs:
        wall = r.get("wall_seconds")
        lines.append(f"| {LABELS[r['model']]} | {r['seed']} | {r['total_params'] / 1e6:.2f}M | "
                     f"{r['active_params'] / 1e6:.2f}M | {r['tokens']} | {_f(r['val_loss'])} | "
                     f"{_f(r['val_ppl'], '%.1f')} | {_f(r['tokens_per_s'], '%.0f')} | "
                     f"{_f(None if wall is None else wall / 60, '%.1f')} | "
                     f"{_f(r['lambada_acc'])} | {_f(r['lambada_ppl'], '%.1f')} | "
                     f"{_f(r['piqa_acc'])} | {_f(r['piqa_acc_norm'])} |")
    lines += ["", "## Per arm", "", "| arm | seeds | final val loss | mean | seed spread (max-min) |", "|---|---|---|---|---|"]
    for m, a in summary["arms"].items():
        lines.append(f"| {LABELS[m]} | {len(a['seeds'])} | {', '.join(f'{v:.4f}' for v in a['val_loss'])} | "
                     f"{a['mean']:.4f} | {_f(a['spread'])} |")
    pg = (summary.get("moe_vs_dense") or {}).get("paired")
    if pg:
        lines += ["", "Paired by seed (a seed sets both the initialisation and the data order, the same for both arms): "
                      "dense − MoE = " + ", ".join(f"{x['gap']:.4f} (seed {x['seed']})" for x in pg["per_seed"])
                  + f"; mean {pg['mean']:.4f}, spread {_f(pg['spread'])}."]
    te = summary.get("token_efficiency")
    if te:
        lines += ["", f"Token-efficiency ratio (tokens at which each MoE seed first reaches the dense mean's final "
                      f"loss {te['target_loss']:.4f}, linear interpolation between validations, / dense's "
                      f"{te['dense_tokens']:.0f} tokens): "
                      + ", ".join(f"seed {s['seed']} {ratio_text(s)}" for s in te["per_seed"])
                      + f"; mean {_f(te['mean_ratio'], '%.3f')}."]
    gc = summary.get("gap_curve")
    if gc:
        lines += ["", "## The gap along training", "",
                  "Seed means at each validation; dense-equivalent = tokens dense needs to reach the MoE's loss there "
                  "/ those tokens (its inverse at the end is the token-efficiency ratio).", "",
                  "| tokens | dense | MoE | gap (nats) | dense-equivalent |", "|---|---|---|---|---|"]
        lines += [f"| {p['tokens']} | {p['dense']:.4f} | {p['moe']:.4f} | {p['gap']:+.4f} | "
                  f"{_f(p['dense_equivalent'], '%.2fx')} |" for p in gc]
    bal = summary.get("balance")
    if bal:
        lines += ["", f"## Routing balance (every logged iteration from {BALANCE_FROM} on, every MoE layer)", "",
                  "tokens/expert max/mean (mean = routed pairs / experts) and dropped tokens; the bound is max/mean <= "
                  f"{MAX_OVER_MEAN:g} and dropped <= {MAX_DROPPED_PCT:g}%.", "",
                  "| run | seed | iterations checked | worst max/mean | worst dropped | iterations outside the bound "
                  "| first outside |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {LABELS[b['model']]} | {b['seed']} | {b['iterations']} | {b['worst_max_over_mean']:.2f} | "
                  f"{b['worst_dropped_pct']:.2f}% | {b['over']} | {_f(b['first_over'], '%d')} |" for b in bal]
    ds = summary.get("ds_moe_vs_moe")
    if ds:
        lines += ["", f"DeepSpeed top-1 MoE (study v1's recipe, 1 seed) {ds['ds_moe']:.4f} vs modern MoE mean "
                      f"{ds['moe_mean']:.4f} ({ds['diff']:+.4f} nats)."]
    lines += ["", "![validation loss against training tokens](study_val_loss.png)", "",
              "## Issue 28's targets", "", "| claim | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['target']} | {c['measured']} | {'PASS' if c['pass'] else 'MISS'} |"
              for c in verdicts]
    lines += ["", "`python tools/study_claims.py docs/study.json` prints these claims from the JSON."]
    return "\n".join(lines) + "\n"


COLORS = {"dense": "tab:gray", "moe": "tab:blue", "ds_moe": "tab:red", "pr_moe": "tab:green", "mos": "tab:purple",
          "student_no_kd": "tab:olive"}


def plot(runs, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for r in runs:
        c = r["val_curve"]
        if c:
            ax.plot([t / 1e6 for t, _ in c], [v for _, v in c], marker="o", markersize=2.5, lw=1.2,
                    color=COLORS[r["model"]], alpha=0.85, label=f"{LABELS[r['model']]} (seed {r['seed']})")
    te = summary.get("token_efficiency")
    if te:
        ax.axhline(te["target_loss"], color="k", ls="--", lw=0.8, label="dense mean final loss")
        for s in te["per_seed"]:
            if s["tokens"] is not None:
                ax.plot([s["tokens"] / 1e6], [te["target_loss"]], marker="x", color="k", markersize=7)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation lm loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, (m, a) in enumerate(summary["arms"].items()):
        bx.scatter([i] * len(a["val_loss"]), a["val_loss"], color=COLORS[m], s=18)
        bx.hlines(a["mean"], i - 0.3, i + 0.3, color=COLORS[m])
    bx.set_xticks(range(len(summary["arms"])))
    bx.set_xticklabels([LABELS[m] for m in summary["arms"]], rotation=30, ha="right", fontsize=7)
    bx.set_ylabel("final validation loss (per seed; line = mean)")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def header_lines(args):
    h = ["# CPU-scale study v2: dense vs MoE (3 seeds each) vs DeepSpeed top-1 MoE, PR-MoE and Mixture-of-Students",
         "", "Made by `examples_moe/run_study.sh` (all settings are at the top of that script); study v1 (DeepSpeed "
         "top-1 MoE, 2 seeds) is in [study_v1.md](study_v1.md)."]
    if args.recipe:
        h.append(f"Recipes: {args.recipe}.")
    if args.budget and os.path.isfile(args.budget):
        b = json.load(open(args.budget))
        h.append(f"Token budget {b['tokens_per_run']} per run from measured tokens/s "
                 f"({', '.join(f'{k} {v:.0f}' for k, v in b['tokens_per_s'].items())}); planned "
                 f"{b['planned_minutes']} of {b['minutes']:g} minutes.")
    lrrt = os.path.join(args.lr_range_test or "", "output.txt")
    if args.lr_range_test and os.path.isfile(lrrt):
        found = re.search(r"OneCycle flags: (.*)", open(lrrt).read())
        h.append(f"LR from the range test (`tools/lr_range_test.py`): `{found.group(1) if found else '?'}`.")
    if args.wall_seconds is not None:
        h.append(f"Wall time of the whole study: {args.wall_seconds / 60:.1f} minutes.")
    return "\n".join(h)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="MODEL:SEED=DIR, in table order")
    p.add_argument("--output", required=True, help="markdown report")
    p.add_argument("--json", default=None, help="the same numbers as JSON (runs, summary, claims, targets)")
    p.add_argument("--plot", default=None, help="PNG of validation loss against training tokens")
    p.add_argument("--budget", default=None, help="tools/study_budget.py's JSON (measured tokens/s, planned time)")
    p.add_argument("--lr-range-test", default=None, help="tools/lr_range_test.py's output directory")
    p.add_argument("--wall-seconds", type=float, default=None, help="the study's wall time")
    p.add_argument("--recipe", default=None, help="one line naming the MoE recipes, for the header")
    p.add_argument("--notes", default=None,
                   help="hand-written markdown appended to the report (the study's design and the reading of its "
                        "results: docs/study_notes.md), so that regenerating the report keeps it")
    args = p.parse_args(argv)
    try:
        runs = collect(args.runs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(runs)
    verdicts = claims(summary)
    md = markdown(runs, summary, verdicts, header_lines(args))
    if args.notes:
        try:
            with open(args.notes) as f:
                md += "\n" + f.read()
        except OSError as e:
            print(f"error: --notes {args.notes}: {e.strerror}", file=sys.stderr)
            return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"version": 2, "targets": TARGETS, "wall_seconds": args.wall_seconds,
                       "runs": [{k: v for k, v in r.items() if k != "dir"} for r in runs],
                       "summary": summary, "claims": verdicts}, f, indent=1)
    if args.plot:
        plot(runs, summary, args.plot)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
