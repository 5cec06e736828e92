#!/usr/bin/env python
"""`make demo`'s last step: from the training log, write the loss curve (training lm loss per logged iteration and
the validation losses) as a PNG and print one line with the validation perplexity, the expert load of the last
logged iteration and the generated sample.

    python tools/demo_summary.py --log outputs/demo/train.log --png outputs/demo/checkpoints/loss_curve.png \\
        --tokens-per-expert-mean 1024 --sample-file outputs/demo/sample.txt

Load balance: tokens/expert max/mean per MoE layer, with mean = the iteration's routed pairs / experts
(global batch x sequence x top-k / experts, --tokens-per-expert-mean); 'balanced' when every layer's max/mean is
<= 2.0 and its dropped share <= 5% (the bounds of docs/routing_health.md).
"""
import argparse
import math
import re
import sys

MAX_OVER_MEAN = 2.0
MAX_DROPPED = 0.05

_ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+)")
_VAL = re.compile(r"validation loss at (.*?) \| lm loss value: ([0-9.eE+-]+)")
_MOE = re.compile(r"moe layer (\d+): aux \S+ \| tokens/expert min (\d+) max (\d+) cv \S+ \| dropped ([0-9.]+)%")


def parse_log(text):
    """{'train': [(iteration, loss)], 'valid': [(iteration or None, loss)], 'final_val': loss or None,
    'moe': [(layer, max tokens, dropped fraction)] of the last logged iteration}."""
    train, valid, final, moe = [], [], None, []
    for line in text.splitlines():
        m = _ITER.search(line)
        if m:
            train.append((int(m.group(1)), float(m.group(2))))
            moe = []
            continue
        m = _VAL.search(line)
        if m:
            where, loss = m.group(1), float(m.group(2))
            it = re.match(r"iteration (\d+)", where)
            if it:
                valid.append((int(it.group(1)), loss))
            elif "validation set" in where:
                final = loss
            continue
        m = _MOE.search(line)
        if m:
            moe.append((int(m.group(1)), int(m.group(3)), float(m.group(4)) / 100.0))
    return {"train": train, "valid": valid, "final_val": final, "moe": moe}


def plot(parsed, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if parsed["train"]:
        ax.plot(*zip(*parsed["train"]), marker=".", label="training lm loss (logged iterations)")
    points = list(parsed["valid"])
    if parsed["final_val"] is not None and parsed["train"]:
        points.append((parsed["train"][-1][0], parsed["final_val"]))
    if points:
        ax.plot(*zip(*points), marker="o", linestyle="--", label="validation lm loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_line(moe, mean):
    """'max/mean 1.31, 1.22, 1.40 (dropped 0.0%): balanced' for the MoE layers, or '' for a dense model."""
    if not moe:
        return ""
    ratios = [mx / mean for _, mx, _ in moe]
    dropped = max(d for _, _, d in moe)
    ok = max(ratios) <= MAX_OVER_MEAN and dropped <= MAX_DROPPED
    return (f"expert load max/mean {', '.join(f'{r:.2f}' for r in ratios)} (dropped {100 * dropped:.1f}%): "
            + ("balanced" if ok else f"NOT balanced (bounds: max/mean <= {MAX_OVER_MEAN}, dropped <= "
                                     f"{100 * MAX_DROPPED:.0f}%)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True, help="pretrain_gpt.py's stdout")
    p.add_argument("--png", required=True, help="the loss-curve PNG to write")
    p.add_argument("--tokens-per-expert-mean", type=float, default=None,
                   help="an iteration's routed pairs / experts (omit for a dense model)")
    p.add_argument("--sample-file", default=None, help="the generated sample (tools/generate.py's output)")
    args = p.parse_args(argv)
    parsed = parse_log(open(args.log, encoding="utf-8").read())
    if not parsed["train"]:
        print(f"error: no iteration lines in {args.log}", file=sys.stderr)
        return 2
    plot(parsed, args.png)
    val = parsed["final_val"] if parsed["final_val"] is not None else (parsed["valid"] or [(None, None)])[-1][1]
    parts = [f"validation ppl {math.exp(min(20.0, val)):.1f}" if val is not None else "validation ppl n/a"]
    if args.tokens_per_expert_mean:
        parts.append(load_line(parsed["moe"], args.tokens_per_expert_mean))
    if args.sample_file:
        sample = " ".join(open(args.sample_file, encoding="utf-8").read().split())
        parts.append(f"sample: {sample!r}")
    print(f"wrote {args.png}")
    print("demo: " + " | ".join(x for x in parts if x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
