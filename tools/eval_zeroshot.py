#!/usr/bin/env python
"""Zero-shot evaluation of a checkpoint (lambada, piqa, boolq, race, triviaqa, webqs), scored like lm-evaluation-harness.

Example:
    python tools/eval_zeroshot.py --load CKPT --tasks lambada,piqa --data-dir ../shared/data \\
        --micro-batch-size 8 --output results.json

Architecture and tokenizer come from the checkpoint; --vocab-file/--merge-file/--tokenizer-model, --seq-length
and the MoE flags override them. MoE layers route dropless unless --moe-eval-token-dropping or
--moe-eval-capacity-factor asks for capacity routing (recorded in the JSON's settings.moe). Prints a markdown table on stdout, a progress bar and timings on stderr.
Exit codes: 0 ok; 2 bad flags, unknown task, missing/bad-hash data file, or unreadable checkpoint (one line on
stderr naming the flag or file).
"""
import argparse
import logging
import sys


import torch

from megatron.offload import add_expert_offload_args, expert_offload_config_from_args
from megatron.eval.runner import EvalConfig, markdown_table, run_zeroshot, write_report
from megatron.offload import USER_ERRORS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (latest_checkpointed_iteration.txt) or iter dir")
    p.add_argument("--tasks", default="lambada,piqa", help="comma-separated task names: lambada, piqa, boolq, race, triviaqa, webqs (default lambada,piqa)")
    p.add_argument("--data-dir", default=None, help="folder holding lambada/ and piqa/ (default: $DATA_DIR, "
                                                     "../shared/data, ./data)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="requests per forward (results do not depend on it)")
    lam = p.add_mutually_exclusive_group()
    lam.add_argument("--strict-lambada", action="store_true",
                     help="LAMBADA target = the whole last word (the default; harness lambada_openai scoring)")
    lam.add_argument("--lambada-last-token", action="store_true",
                     help="LAMBADA target = only the last BPE token of the text (Megatron-LM non-strict)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--eval-fp32", action="store_true",
                      help="fp32 weights without autocast, log_softmax in fp64 (for exact checks)")
    prec.add_argument("--bf16", action="store_true", help="run the forward under bf16 autocast")
    prec.add_argument("--fp16", action="store_true", help="run the forward under fp16 autocast")
    routing = p.add_mutually_exclusive_group()
    routing.add_argument("--disable-moe-token-dropping", action="store_true",
                         help="dropless MoE evaluation (the default: results do not depend on the batch)")
    routing.add_argument("--moe-eval-token-dropping", action="store_true",
                         help="MoE routing with the checkpoint's eval capacity (tokens over it are dropped, so "
                              "results depend on --micro-batch-size), as DeepSpeed-MoE evaluates")
    p.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="token dropping at this eval capacity factor (implies --moe-eval-token-dropping)")
    p.add_argument("--seq-length", type=int, default=None, help="model window in tokens (default: checkpoint's)")
    p.add_argument("--pad-to-multiple", type=int, default=16,
                   help="right-pad each request to a multiple of this many tokens (default 16)")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents of each task (smoke tests)")
    p.add_argument("--bootstrap-iters", type=int, default=10000, help="resamples for the perplexity stderr")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cuda when available)")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_expert_offload_args(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        load=args.load,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        data_dir=args.data_dir,
        micro_batch_size=args.micro_batch_size,
        lambada_last_token=args.lambada_last_token,  # --strict-lambada is the default behaviour
        eval_fp32=args.eval_fp32,
        autocast_dtype="bf16" if args.bf16 else ("fp16" if args.fp16 else None),
        drop_tokens=args.moe_eval_token_dropping,  # dropless unless asked (a capacity factor also asks)
        eval_capacity_factor=args.moe_eval_capacity_factor,
        seq_length=args.seq_length,
        pad_multiple=args.pad_to_multiple,
        limit=args.limit,
        bootstrap_iters=args.bootstrap_iters,
        seed=args.seed,
        device=args.device,
        tokenizer_overrides={"vocab_file": args.vocab_file, "merge_file": args.merge_file,
                             "tokenizer_model": args.tokenizer_model},
        progress=not args.no_progress,
        offload=expert_offload_config_from_args(args),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.disable_moe_token_dropping and args.moe_eval_capacity_factor is not None:
        print("error: --moe-eval-capacity-factor asks for token dropping; drop --disable-moe-token-dropping",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        report = run_zeroshot(config_from_args(args))
        if args.output:
            write_report(report, args.output)
        if args.stats_json and report.get("offload") is not None:
            write_report(report["offload"], args.stats_json, "--stats-json")
    except USER_ERRORS as e:  # a bug is not one of these: it keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    if report.get("offload") is not None:
        from megatron.offload import offload_report

        print(offload_report(report["offload"]), file=sys.stderr)
    for t in report["timings"]:
        print(f"{t['task']}: {t['num_examples']} examples, {t['seconds']:.1f} s, "
              f"{t['examples_per_second']:.1f} examples/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
