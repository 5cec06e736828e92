"""Sample text from a checkpoint: tools/generate.py --load CKPT --prompt "..." --max-new-tokens N."""
import argparse
import sys


import torch

from megatron.offload import add_expert_offload_args, expert_offload_config_from_args
from megatron.errors import ConfigError
from megatron.eval.runner import write_report
from megatron.inference import generate, load_model_for_inference, moe_eval_overrides
from megatron.offload import USER_ERRORS, offload_report
from megatron.tokenizer import decode_continuation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--load", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt) or iter dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix each step (for checks)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--moe-eval-token-dropping", action="store_true",
                   help="MoE routing with the checkpoint's eval capacity (default: dropless)")
    p.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="token dropping at this eval capacity factor (implies --moe-eval-token-dropping)")
    add_expert_offload_args(p)
    args = p.parse_args(argv)
    model = None
    try:
        if args.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 0")
        if not 0.0 < args.top_p <= 1.0:
            raise ConfigError(f"--top-p ({args.top_p}) must be in (0, 1]")
        if args.top_k < 0 or args.temperature < 0:
            raise ConfigError("--top-k and --temperature must be >= 0")
        offload = expert_offload_config_from_args(args)
        model, tok, _ = load_model_for_inference(
            args.load, device=args.device,
            tokenizer_overrides={"vocab_file": args.vocab_file, "merge_file": args.merge_file,
                                 "tokenizer_model": args.tokenizer_model}, offload=offload,
            moe_overrides=moe_eval_overrides(args.moe_eval_token_dropping, args.moe_eval_capacity_factor))
        ids = tok.tokenize(args.prompt)
        new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                       eod=tok.eod, use_cache=not args.no_kv_cache, vocab_size=tok.vocab_size,
                       progress=not args.no_progress and args.max_new_tokens >= 32)
        stats = model.offload.summary() if model.offload is not None else None
        if stats is not None and args.stats_json:
            write_report({**stats, "new_tokens": len(new)}, args.stats_json, "--stats-json")
    except USER_ERRORS as e:  # a bug is not one of these: it keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if model is not None and model.offload is not None:
            model.offload.close()
    print(args.prompt + decode_continuation(tok, ids, new))  # not detokenize(new): SentencePiece drops its space
    if stats is not None:
        stats["new_tokens"] = len(new)
        print(offload_report(stats), file=sys.stderr)
    return 0



if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
