"""Collect the CPU-scale MoE study (examples_moe/run_study.sh) into docs/study.md, docs/study.json and a plot of
validation loss against training tokens, and judge the DeepSpeed-MoE claims against the issue's targets.

    python tools/study_report.py --runs dense:1234=outputs/study/dense_s1234 moe:1234=... pr_moe:1234=... \
        mos:1234=... student_no_kd:1234=... --output docs/study.md --json docs/study.json --plot docs/study_val_loss.png

Each run directory holds `train.log` (pretrain_gpt.py's output, appended across resumes), `checkpoints/` and
`eval_zeroshot.json`. MODEL is one of dense, moe, pr_moe, mos, student_no_kd.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys


MODELS = ("dense", "moe", "pr_moe", "mos", "student_no_kd")
LABELS = {"dense": "dense", "moe": "MoE", "pr_moe": "PR-MoE", "mos": "MoS student (staged KD)",
          "student_no_kd": "student, no KD"}
VAL_RE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")
END_RE = re.compile(r"validation loss at the end of training \(validation set\) \| lm loss value: ([0-9.E+-]+)")
LOG_RE = re.compile(r" iteration +(\d+)/ *\d+ .*?consumed tokens: +(\d+) .*?tokens/s: (\d+)")
# the issue's targets (the paper's claims at this scale)
MOE_MARGIN_NATS, MOE_SPREAD_FACTOR = 0.03, 3.0
PR_MOE_LOSS_REL, PR_MOE_PARAM_CUT = 0.01, 0.25
MOS_LOSS_REL = 0.01


def parse_log(path):
    """{curve: [(tokens, val loss)], val_loss, tokens, tokens_per_s} from a (possibly resumed) training log."""
    text = open(path).read()
    logged = [(int(i), int(c), int(t)) for i, c, t in LOG_RE.findall(text)]
    per_iter = logged[0][1] // logged[0][0] if logged else 0
    curve = {int(i) * per_iter: float(v) for i, v in VAL_RE.findall(text)}  # a resumed run repeats no iteration
    end = END_RE.findall(text)
    tokens = max((c for _, c, _ in logged), default=0)
    if end:
        curve[tokens] = float(end[-1])
    tok_s = [t for _, _, t in logged]
    return {"curve": sorted(curve.items()), "val_loss": float(end[-1]) if end else float("nan"), "tokens": tokens,
            "tokens_per_s": statistics.median(tok_s[1:] or tok_s) if tok_s else float("nan")}


def count_params(ckpt):
    """(total, active per token): the experts a token is not routed to are not active (top-k of each layer)."""
    from megatron.inference import load_model_for_inference
    from moe.experts import is_expert_param

    model, _, configs = load_model_for_inference(ckpt)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    moe = configs.get("moe")
    for mod in model.modules():
        if hasattr(mod, "num_local_experts") and hasattr(mod, "ep_size"):
            experts = [p for p in mod.parameters() if is_expert_param(p)]
            per_expert = sum(p.numel() for p in experts) // mod.num_local_experts
            inactive += (mod.num_local_experts - moe["topk"]) * per_expert
    return total, total - inactive


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
        total, active = count_params(os.path.join(d, "checkpoints"))
        ev = eval_metrics(os.path.join(d, "eval_zeroshot.json"))
        runs.append({"model": model, "seed": seed, "val_loss": log["val_loss"],
                     "val_ppl": math.exp(min(log["val_loss"], 30.0)), "tokens": log["tokens"],
                     "total_params": total, "active_params": active, "tokens_per_s": log["tokens_per_s"],
                     "lambada_acc": ev.get(("lambada", "acc")), "lambada_ppl": ev.get(("lambada", "ppl")),
                     "piqa_acc": ev.get(("piqa", "acc")), "piqa_acc_norm": ev.get(("piqa", "acc_norm")),
                     "val_curve": log["curve"], "dir": d})
    return runs


def _by(runs, model):
    return [r for r in runs if r["model"] == model]


def claims(runs):
    """[(claim, target, measured, verdict)]: the issue's targets evaluated on the numbers, nothing tuned."""
    out = []
    loss = {m: [r["val_loss"] for r in _by(runs, m)] for m in MODELS}
    spreads = [max(v) - min(v) for v in (loss["dense"], loss["moe"]) if len(v) > 1]
    spread = max(spreads) if spreads else float("nan")
    if loss["dense"] and loss["moe"]:
        gap = statistics.mean(loss["dense"]) - statistics.mean(loss["moe"])
        need = max(MOE_MARGIN_NATS, MOE_SPREAD_FACTOR * spread) if spreads else float("nan")
        out.append(("MoE below dense at equal tokens", f">= max(0.03, 3 x seed spread {spread:.4f}) nats",
                    f"dense {statistics.mean(loss['dense']):.4f} - MoE {statistics.mean(loss['moe']):.4f} = "
                    f"{gap:.4f}", gap >= need))
    if loss["moe"] and loss["pr_moe"]:
        moe_loss, pr = statistics.mean(loss["moe"]), loss["pr_moe"][0]
        p_moe, p_pr = _by(runs, "moe")[0]["total_params"], _by(runs, "pr_moe")[0]["total_params"]
        cut = 1 - p_pr / p_moe
        out.append(("PR-MoE matches MoE with fewer parameters", "loss within 1% of MoE, >= 25% fewer total params",
                    f"{pr:.4f} vs {moe_loss:.4f} ({100 * (pr / moe_loss - 1):+.2f}%), {100 * cut:.0f}% fewer "
                    f"params", pr <= moe_loss * (1 + PR_MOE_LOSS_REL) and cut >= PR_MOE_PARAM_CUT))
    if loss["mos"] and loss["pr_moe"] and loss["student_no_kd"]:
        mos, teacher, no_kd = loss["mos"][0], loss["pr_moe"][0], loss["student_no_kd"][0]
        out.append(("MoS student keeps the teacher's quality", "within 1% of the PR-MoE teacher, below the no-KD "
                    f"student by more than the seed spread ({spread:.4f})",
                    f"{mos:.4f} vs teacher {teacher:.4f} ({100 * (mos / teacher - 1):+.2f}%), vs no-KD {no_kd:.4f}",
                    mos <= teacher * (1 + MOS_LOSS_REL) and (no_kd - mos) > spread))
    return out


def _fmt(v, f):
    return (f % v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else "n/a"


def markdown(runs, verdicts, header):
    lines = [header, "", "| model | seed | total params | active params/token | train tokens | val loss | val ppl | "
             "tokens/s | LAMBADA acc | LAMBADA ppl | PIQA acc | PIQA acc_norm |", "|---" * 12 + "|"]
    for r in runs:
        lines.append(f"| {LABELS[r['model']]} | {r['seed']} | {r['total_params'] / 1e6:.2f}M | "
                     f"{r['active_params'] / 1e6:.2f}M | {r['tokens']} | {_fmt(r['val_loss'], '%.4f')} | "
                     f"{_fmt(r['val_ppl'], '%.1f')} | {_fmt(r['tokens_per_s'], '%.0f')} | "
                     f"{_fmt(r['lambada_acc'], '%.4f')} | {_fmt(r['lambada_ppl'], '%.1f')} | "
                     f"{_fmt(r['piqa_acc'], '%.4f')} | {_fmt(r['piqa_acc_norm'], '%.4f')} |")
    lines += ["", "![validation loss against training tokens](study_val_loss.png)", "",
              "## The claims against the issue's targets", "", "| claim | target | measured | reproduced |",
              "|---|---|---|---|"]
    lines += [f"| {c} | {t} | {m} | {'yes' if ok else 'no'} |" for c, t, m, ok in verdicts]
    return "\n".join(lines) + "\n"


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in runs:
        c = r["val_curve"]
        if c:
            ax.plot([t / 1e6 for t, _ in c], [v for _, v in c], marker="o", markersize=3,
                    label=f"{LABELS[r['model']]} (seed {r['seed']})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation lm loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="MODEL:SEED=DIR, in table order")
    p.add_argument("--output", required=True, help="markdown report")
    p.add_argument("--json", default=None, help="the same numbers as JSON ({'runs': [...]})")
    p.add_argument("--plot", default=None, help="PNG of validation loss against training tokens")
    p.add_argument("--budget", default=None, help="tools/study_budget.py's JSON (measured tokens/s, planned time)")
    p.add_argument("--lr-range-test", default=None, help="tools/lr_range_test.py's output directory")
    p.add_argument("--wall-seconds", type=float, default=None, help="the study's wall time")
    args = p.parse_args(argv)
    try:
        runs = collect(args.runs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdicts = claims(runs)
    header = ["# CPU-scale study: dense vs MoE vs PR-MoE vs Mixture-of-Students", "",
              "Made by `examples_moe/run_study.sh` (all settings are at the top of that script)."]
    if args.budget and os.path.isfile(args.budget):
        b = json.load(open(args.budget))
        header.append(f"Token budget {b['tokens_per_run']} per run from measured tokens/s "
                      f"({', '.join(f'{k} {v:.0f}' for k, v in b['tokens_per_s'].items())}); planned "
                      f"{b['planned_minutes']} of {b['minutes']:g} minutes.")
    lrrt = os.path.join(args.lr_range_test or "", "output.txt")
    if args.lr_range_test and os.path.isfile(lrrt):
        found = re.search(r"OneCycle flags: (.*)", open(lrrt).read())
        header.append(f"LR from the range test (`tools/lr_range_test.py`): `{found.group(1) if found else '?'}`.")
    if args.wall_seconds is not None:
        header.append(f"Wall time of the whole study: {args.wall_seconds / 60:.1f} minutes.")
    md = markdown(runs, verdicts, "\n".join(header))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": [{k: v for k, v in r.items() if k != "dir"} for r in runs],
                       "claims": [{"claim": c, "target": t, "measured": m, "reproduced": ok}
                                  for c, t, m, ok in verdicts]}, f, indent=1)
    if args.plot:
        plot(runs, args.plot)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
