"""Collect a CPU-scale PR-MoE / MoS study into a markdown table and a validation-loss plot.

    python tools/study_report.py --runs dense=outputs/study/dense moe=outputs/study/moe ... \
        --output docs/study.md --plot docs/study_val_loss.png

Each run directory holds `train.log` (pretrain_gpt.py's output), `checkpoints/` and `eval_zeroshot.json`.
"""
import argparse
import json
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VAL_RE = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")
END_RE = re.compile(r"validation loss at the end of training \(validation set\) \| lm loss value: ([0-9.E+-]+)")
TOK_RE = re.compile(r"consumed tokens:\s+(\d+) .* tokens/s: (\d+)")


def parse_log(path):
    text = open(path).read()
    curve = [(int(i), float(v)) for i, v in VAL_RE.findall(text)]
    end = END_RE.findall(text)
    tok_s = [int(t) for _, t in TOK_RE.findall(text)]
    tokens = max((int(c) for c, _ in TOK_RE.findall(text)), default=0)
    iters = [int(i) for i in re.findall(r" iteration +(\d+)/", text)]
    if end and iters and (not curve or curve[-1][0] != max(iters)):
        curve.append((max(iters), float(end[-1])))  # the end-of-training validation, at the last iteration
    return {"curve": curve, "val_loss": float(end[-1]) if end else (curve[-1][1] if curve else float("nan")),
            "tokens_per_s": statistics.median(tok_s[1:] or tok_s) if tok_s else float("nan"), "tokens": tokens}


def count_params(ckpt):
    """(total, active per token): experts a token does not use are not active."""
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
    rows = data.get("results", data if isinstance(data, list) else [])
    out = {}
    for r in rows:
        out[(r.get("task"), r.get("metric"))] = r.get("value")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="NAME=DIR pairs, in table order")
    p.add_argument("--output", required=True)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    rows, curves = [], {}
    for spec in args.runs:
        if "=" not in spec:
            print(f"error: --runs {spec!r}: expected NAME=DIR", file=sys.stderr)
            return 2
        name, d = spec.split("=", 1)
        log = parse_log(os.path.join(d, "train.log"))
        total, active = count_params(os.path.join(d, "checkpoints"))
        ev = eval_metrics(os.path.join(d, "eval_zeroshot.json"))
        curves[name] = log["curve"]
        rows.append((name, total, active, log, ev))
    lines = ["| model | total params | active params/token | train tokens | val loss | val ppl | tokens/s | "
             "LAMBADA acc | LAMBADA ppl | PIQA acc | PIQA acc_norm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) and not math.isnan(v) else "n/a"  # noqa: E731
    for name, total, active, log, ev in rows:
        lines.append(f"| {name} | {total / 1e6:.2f}M | {active / 1e6:.2f}M | {log['tokens']} | "
                     f"{fmt(log['val_loss'], '%.4f')} | {fmt(math.exp(min(log['val_loss'], 30)), '%.1f')} | "
                     f"{fmt(log['tokens_per_s'], '%.0f')} | {fmt(ev.get(('lambada', 'acc')), '%.4f')} | "
                     f"{fmt(ev.get(('lambada', 'ppl')), '%.1f')} | {fmt(ev.get(('piqa', 'acc')), '%.4f')} | "
                     f"{fmt(ev.get(('piqa', 'acc_norm')), '%.4f')} |")
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(table + "\n")
    print(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, c in curves.items():
            if c:
                ax.plot([i for i, _ in c], [v for _, v in c], marker="o", label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation lm loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
