#!/usr/bin/env python
"""Print the study's claims from docs/study.json with their figures and PASS/MISS against issue 28's targets.

    python tools/study_claims.py [docs/study.json]

Figures: per arm the final validation losses and seed spread (max - min); the MoE-dense gap and gap / larger spread;
the token-efficiency ratio per MoE seed and its mean; DeepSpeed top-1 vs modern MoE; PR-MoE vs MoE (loss %, parameter
%); MoS vs its teacher. A study v2 JSON carries them in "summary"; for an older JSON (study v1, no "version") they
are computed from its "runs". Exit status 0 whatever the verdicts; 2 (one line on stderr) if the JSON is unreadable.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_report as sr  # noqa: E402


def _pct(x):
    return f"{100 * x:+.2f}%"


V1_LABELS = {**sr.LABELS, "moe": "MoE (v1: DeepSpeed top-1)"}  # study v1's MoE was the DeepSpeed recipe


def figure_lines(summary, labels=sr.LABELS):
    """The figures behind the claims, one per line."""
    lines = []
    for m, a in summary["arms"].items():
        lines.append(f"{labels.get(m, m)}: final val loss {', '.join(f'{v:.4f}' for v in a['val_loss'])}; mean "
                     f"{a['mean']:.4f}; seed spread {sr._f(a['spread'])} ({len(a['val_loss'])} seed(s))")
    g = summary.get("moe_vs_dense")
    if g:
        lines.append(f"MoE - dense gap: {g['gap']:.4f} nats; larger seed spread {sr._f(g['larger_spread'])}; "
                     f"gap / larger spread {sr._f(g['gap_over_spread'], '%.2f')}")
        if g.get("paired"):
            p = g["paired"]
            lines.append("MoE - dense gap paired by seed (same data order): "
                         + ", ".join("%.4f (seed %s)" % (x["gap"], x["seed"]) for x in p["per_seed"])
                         + f"; spread {sr._f(p['spread'])}")
    te = summary.get("token_efficiency")
    if te:
        for s in te["per_seed"]:
            lines.append(f"token-efficiency ratio, MoE seed {s['seed']}: {sr.ratio_text(s)}")
        lines.append(f"token-efficiency ratio, mean: {sr._f(te['mean_ratio'], '%.3f')} ({te['reached']} of "
                     f"{te['of']} seeds reached dense's mean final loss {te['target_loss']:.4f})")
    ds = summary.get("ds_moe_vs_moe")
    if ds:
        lines.append(f"DeepSpeed top-1 MoE vs modern MoE: {ds['ds_moe']:.4f} vs {ds['moe_mean']:.4f} "
                     f"({ds['diff']:+.4f} nats)")
    pr = summary.get("pr_moe_vs_moe")
    if pr:
        lines.append(f"PR-MoE vs MoE: loss {_pct(pr['loss_rel'])}, parameters {_pct(-pr['param_cut'])} "
                     f"({pr['pr_moe_params'] / 1e6:.2f}M vs {pr['moe_params'] / 1e6:.2f}M)")
    mos = summary.get("mos_vs_teacher")
    if mos:
        no_kd = "" if mos["no_kd"] is None else f"; vs the no-KD student {mos['mos_minus_no_kd']:+.4f} nats"
        lines.append(f"MoS vs its PR-MoE teacher: loss {_pct(mos['loss_rel'])}{no_kd}")
    for b in summary.get("balance", []):
        lines.append(f"routing balance, {labels.get(b['model'], b['model'])} seed {b['seed']}: worst max/mean "
                     f"{b['worst_max_over_mean']:.2f}, worst dropped {b['worst_dropped_pct']:.2f}% over "
                     f"{b['iterations']} iterations from {b['from_iteration']}; {b['over']} outside the bound")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "docs/study.json"
    try:
        with open(path) as f:
            data = json.load(f)
        summary = data.get("summary") or sr.summarize(data["runs"])
        version = data.get("version", 1)
        figures, verdicts = figure_lines(summary, V1_LABELS if version == 1 else sr.LABELS), sr.claims(summary)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        kind = type(e).__name__
        print(f"error: {path}: unreadable study JSON ({kind}: {e}); run examples_moe/run_study.sh (it writes it "
              f"via tools/study_report.py)", file=sys.stderr)
        return 2
    print(f"study v{version} ({path})")
    for line in figures:
        print(f"  {line}")
    for c in verdicts:
        print(f"{'PASS' if c['pass'] else 'MISS'}  {c['claim']}: {c['measured']} (target {c['target']})")
    passed = sum(c["pass"] for c in verdicts)
    print(f"{passed} of {len(verdicts)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
