#!/usr/bin/env python
"""LR range test (DeepSpeed's LRRangeTest, Smith 2018) through the training code: train for --steps with the LR
rising linearly from --min-lr to --max-lr, write loss vs LR (CSV + PNG), print the suggested maximum LR and the
OneCycle flags it implies.

    python tools/lr_range_test.py --steps 100 --min-lr 1e-5 --max-lr 1e-1 --output-dir outputs/lrrt -- \\
        <your pretrain_gpt.py flags: model, data, batch, tokenizer ...>

The training command can be pasted as it is: its length, schedule, warmup and checkpoint flags (--train-iters,
--train-tokens, --lr*, --lr-decay-*, --lr-warmup-*, --save, --save-interval, --exit-*) are replaced.

Rule for the suggestion: the loss is smoothed with a bias-corrected exponential moving average (beta 0.9, as
fastai and Smith's write-ups do); the run stops early once the smoothed loss exceeds 4x its minimum or is not
finite (diverged). LR_min = the LR at the smoothed loss's minimum: beyond it a larger LR no longer makes
progress, which is where Smith puts the top of the usable range. Suggested cycle_max_lr = LR_min / 2: the EMA lags
the raw loss by ~1/(1 - beta) = 10 steps, so the minimum is seen a little after the LR that caused it, and one
noisy sweep's minimum is an upper estimate; half keeps the peak of a whole cycle inside the stable range.
cycle_min_lr = cycle_max_lr / 10 (Smith's 1cycle ratio).
"""
import argparse
import csv
import math
import os
import sys


SMOOTH_BETA = 0.9  # EMA factor of the smoothed loss
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
MAX_FRACTION = 0.5  # suggested cycle_max_lr = MAX_FRACTION x LR at the smoothed minimum
MIN_RATIO = 10.0  # suggested cycle_min_lr = cycle_max_lr / MIN_RATIO

# flags of the pasted training command that the range test sets itself (each takes one value, except the switches)
_REPLACED = {"--train-iters", "--train-tokens", "--lr", "--min-lr", "--lr-decay-style", "--lr-warmup-iters",
             "--lr-warmup-tokens", "--lr-decay-iters", "--lr-decay-tokens", "--save", "--save-interval", "--load",
             "--exit-interval", "--exit-duration-in-mins", "--log-interval", "--eval-interval",
             "--lr-range-test-min-lr", "--lr-range-test-step-size", "--lr-range-test-step-rate"}
_REPLACED_SWITCHES = {"--lr-range-test-staircase", "--exit-signal-handler"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s [options] -- <pretrain_gpt.py flags>")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the sweep")
    p.add_argument("--min-lr", type=float, default=1e-5, help="LR of the first step")
    p.add_argument("--max-lr", type=float, default=1e-1, help="LR of the last step")
    p.add_argument("--output-dir", required=True, help="writes lr_range_test.csv and lr_range_test.png here")
    p.add_argument("--planned-iters", type=int, default=None,
                   help="length of the run the OneCycle flags are for (default: not printed as step sizes)")
    p.add_argument("--no-early-stop", action="store_true", help="run all --steps even after divergence")
    if argv is None:
        argv = sys.argv[1:]
    ours, train = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(ours)
    if args.steps < 2:
        p.error(f"--steps ({args.steps}) must be >= 2")
    if not 0 < args.min_lr < args.max_lr:
        p.error(f"--min-lr ({args.min_lr}) and --max-lr ({args.max_lr}) must satisfy 0 < min < max")
    return args, strip_replaced(train)


def strip_replaced(argv):
    """The training flags without those the range test sets itself."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _REPLACED:
            skip = "=" not in a
            continue
        if name in _REPLACED_SWITCHES:
            continue
        out.append(a)
    return out


def sweep_flags(steps: int, min_lr: float, max_lr: float):
    """LRRangeTest flags whose LR goes from min_lr at step 0 to max_lr at step steps - 1, linearly."""
    rate = (max_lr / min_lr - 1.0) / (steps - 1)
    return ["--train-iters", str(steps), "--lr-decay-style", "lr-range-test", "--lr-range-test-min-lr", repr(min_lr),
            "--lr-range-test-step-size", "1", "--lr-range-test-step-rate", repr(rate), "--lr", repr(max_lr),
            "--lr-warmup-iters", "0", "--log-interval", str(max(1, steps // 20)), "--eval-interval", str(10 ** 9)]


def smooth(losses, beta=SMOOTH_BETA):
    """Bias-corrected EMA of the losses (the first value is the first loss)."""
    out, avg = [], 0.0
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def smoothed_min_step(losses) -> int:
    """The step at which the smoothed loss is lowest (finite values only)."""
    sm = smooth(losses)
    return min((i for i, v in enumerate(sm) if math.isfinite(v)), key=lambda i: sm[i])


def suggest(lrs, losses):
    """(LR at the smoothed minimum, suggested cycle_max_lr, suggested cycle_min_lr) from one sweep."""
    lr_at_min = lrs[smoothed_min_step(losses)]
    max_lr = max(lrs[0], MAX_FRACTION * lr_at_min)  # inside the tested range
    return lr_at_min, max_lr, max_lr / MIN_RATIO


def capped_by_max_lr(losses) -> bool:
    """Whether the smoothed loss is lowest in the sweep's last 5% of steps (at least the last step): it has not
    turned up, so the suggestion is about half of --max-lr (where the sweep stopped), not half of the top of the
    usable range."""
    return smoothed_min_step(losses) >= len(losses) - max(1, math.ceil(0.05 * len(losses)))


def one_cycle_flags(max_lr: float, min_lr: float, planned_iters=None) -> str:
    flags = f"--lr-decay-style one-cycle --cycle-min-lr {min_lr:.3g} --cycle-max-lr {max_lr:.3g}"
    if planned_iters:  # Smith's 1cycle: up over 45%, down over 45%, then the last 10% decaying below cycle_min_lr
        half = max(1, int(0.45 * planned_iters))
        tail = max(1, planned_iters - 2 * half)
        flags += (f" --cycle-first-step-size {half} --cycle-second-step-size {half} --decay-step-size {tail}"
                  f" --decay-lr-rate 9")  # lr at the end = cycle_min_lr / (1 + 9) = cycle_max_lr / 100
    return flags


def run(args, train_argv):
    from megatron.rank0 import is_rank0
    from megatron.training import setup_from_argv, train_step
    from megatron.training_guards import NonFiniteError

    st, train_iter, _, _ = setup_from_argv(train_argv + sweep_flags(args.steps, args.min_lr, args.max_lr))
    lrs, losses = [], []
    best = math.inf
    for _ in range(args.steps):
        lr = st.scheduler.get_lr()
        try:
            m = train_step(st, train_iter)
        except NonFiniteError:
            break  # diverged: the loss or gradient is no longer finite
        lrs.append(lr)
        losses.append(m["lm_loss"])
        sm = smooth(losses)[-1]
        best = min(best, sm)
        if not args.no_early_stop and (not math.isfinite(sm) or sm > DIVERGE_FACTOR * best):
            break
    st.optimizer.synchronize()  # an offloaded expert step still behind the loop (--moe-offload-optimizer nvme) ends before the exit
    rank0 = is_rank0()
    return lrs, losses, rank0


def write_outputs(out_dir, lrs, losses, lr_at_min, max_lr):
    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(out_dir, "lr_range_test.csv"), os.path.join(out_dir, "lr_range_test.png")
    sm = smooth(losses)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, (lr, loss, s) in enumerate(zip(lrs, losses, sm)):
            w.writerow([i, f"{lr:.6g}", f"{loss:.6f}", f"{s:.6f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, alpha=0.35, label="loss")
    ax.plot(lrs, sm, label=f"smoothed (EMA {SMOOTH_BETA})")
    ax.axvline(lr_at_min, color="gray", linestyle=":", label=f"smoothed minimum at {lr_at_min:.3g}")
    ax.axvline(max_lr, color="red", linestyle="--", label=f"suggested max LR {max_lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training lm loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def main(argv=None) -> int:
    from megatron.errors import UserError

    args, train_argv = parse(argv)
    try:
        lrs, losses, rank0 = run(args, train_argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rank0:
        return 0
    if len(losses) < 2:
        print(f"error: the sweep diverged after {len(losses)} step(s); lower --min-lr ({args.min_lr})",
              file=sys.stderr)
        return 2
    lr_at_min, max_lr, min_lr = suggest(lrs, losses)
    csv_path, png_path = write_outputs(args.output_dir, lrs, losses, lr_at_min, max_lr)
    print(f"wrote {csv_path} and {png_path} ({len(losses)} steps, LR {lrs[0]:.3g} .. {lrs[-1]:.3g})")
    print(f"smoothed loss is lowest at LR {lr_at_min:.3g}")
    print(f"suggested max LR: {max_lr:.3g}")
    if capped_by_max_lr(losses):
        print(f"note: the smoothed loss is lowest at the end of the sweep (LR {lrs[-1]:.3g}): the top of the usable "
              f"range lies above --max-lr ({args.max_lr:g}) and the suggestion is capped by it; a sweep to a larger "
              f"--max-lr finds it")
    print(f"OneCycle flags: {one_cycle_flags(max_lr, min_lr, args.planned_iters)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
