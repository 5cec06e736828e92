#!/usr/bin/env python
"""The study's token budget from measured training throughput: the most tokens per run such that every run of
examples_moe/run_study.sh (equal tokens for all) plus their zero-shot evaluations fit the wall-clock budget.

    python tools/study_budget.py --minutes 150 --elapsed-seconds 420 --runs dense=3 moe=3 ds_moe=1 pr_moe=1 \\
        student=2 --calibration dense=outputs/study/calibration/dense.log moe=... ds_moe=... pr_moe=... student=... \\
        --kd-fraction 0.6 --tokens-per-iter 8192 --val-tokens-per-run 1740800 --output outputs/study/budget.json

Throughput of each model kind = the tokens/s of the calibration log's last log line (steady state: the first
steps include warm-up). The MoS student's distillation phase (kd-fraction of its tokens) also runs the teacher's
forward, counted as a third of a PR-MoE training step per token (forward ~ 1/3 of forward + backward). Zero-shot
evaluation of each run (full LAMBADA and PIQA, about EVAL_TOKENS scored tokens, forward only) and its periodic
validation (--val-tokens-per-run held-out tokens, forward only) are reserved at 3x the run's training throughput.
The budget is rounded down to whole iterations.
"""
import argparse
import json
import math
import os
import re
import sys

EVAL_TOKENS = 700_000  # LAMBADA (5153 x ~90 tokens) + PIQA (1838 x 2 choices x ~60 tokens), scored per model
TOK_RE = re.compile(r"tokens/s: (\d+)")


def tokens_per_second(log_path: str) -> float:
    found = TOK_RE.findall(open(log_path).read())
    if not found:
        raise ValueError(f"--calibration {log_path}: no 'tokens/s' log line (did the calibration run finish?)")
    return float(found[-1])


def _pairs(specs, flag, conv):
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"{flag} {spec!r}: expected NAME=VALUE")
        k, v = spec.split("=", 1)
        out[k] = conv(v)
    return out


def budget(minutes, elapsed_s, runs, tps, kd_fraction, tokens_per_iter, val_tokens=0):
    """(tokens per run, planned seconds): solve minutes*60 - elapsed = tokens * seconds_per_token + eval reserve."""
    per_token = sum(n / tps[kind] for kind, n in runs.items())
    per_token += kd_fraction / (3.0 * tps["pr_moe"]) if "student" in runs else 0.0  # teacher forward of one MoS run
    reserve = sum(n * (EVAL_TOKENS + val_tokens) / (3.0 * tps[kind]) for kind, n in runs.items())
    left = minutes * 60.0 - elapsed_s - reserve
    if left <= 0:
        raise ValueError(f"--minutes {minutes:g}: nothing left for training after {elapsed_s:.0f} s spent and "
                         f"{reserve:.0f} s reserved for evaluation")
    iters = int(left / per_token) // tokens_per_iter
    if iters < 1:
        raise ValueError(f"--minutes {minutes:g}: not even one iteration of {tokens_per_iter} tokens fits")
    tokens = iters * tokens_per_iter
    return tokens, elapsed_s + tokens * per_token + reserve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget of the whole study")
    p.add_argument("--elapsed-seconds", type=float, default=0.0, help="already spent (tokenizer, data, range test)")
    p.add_argument("--runs", nargs="+", required=True, help="KIND=COUNT: training runs of each model kind")
    p.add_argument("--calibration", nargs="+", required=True, help="KIND=LOG: a short pretrain_gpt.py log per kind")
    p.add_argument("--kd-fraction", type=float, default=0.0, help="share of the student's tokens with the teacher")
    p.add_argument("--tokens-per-iter", type=int, required=True, help="global batch x sequence length")
    p.add_argument("--val-tokens-per-run", type=int, default=0,
                   help="held-out tokens each run validates on in all (validations x eval-iters x micro batch x seq)")
    p.add_argument("--output", required=True, help="budget JSON")
    args = p.parse_args(argv)
    try:
        runs = _pairs(args.runs, "--runs", int)
        logs = _pairs(args.calibration, "--calibration", str)
        missing = sorted(set(runs) - set(logs))
        if missing:
            raise ValueError(f"--calibration has no log for {', '.join(missing)}")
        tps = {k: tokens_per_second(v) for k, v in logs.items()}
        tokens, planned = budget(args.minutes, args.elapsed_seconds, runs, tps, args.kd_fraction,
                                 args.tokens_per_iter, args.val_tokens_per_run)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"tokens_per_run": tokens, "tokens_per_s": tps, "planned_minutes": round(planned / 60.0, 1),
           "minutes": args.minutes, "elapsed_seconds_before_training": round(args.elapsed_seconds),
           "runs": runs, "kd_fraction": args.kd_fraction, "val_tokens_per_run": args.val_tokens_per_run}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"measured tokens/s: {', '.join(f'{k} {v:.0f}' for k, v in tps.items())}")
    print(f"budget: {tokens} tokens per run ({math.ceil(tokens / args.tokens_per_iter)} iterations); planned study "
          f"time {planned / 60:.1f} of {args.minutes:g} minutes")
    print(tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
