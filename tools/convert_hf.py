#!/usr/bin/env python
"""Hugging Face interop: GPT-2 weights in and out of this project's checkpoints (megatron/hf_interop.py).

    python tools/convert_hf.py import --hf-dir gpt2/ --save ckpt/gpt2 [--vocab-file V --merge-file M]
    python tools/convert_hf.py export --load ckpt/run --save hf/run [--format gpt2|safetensors]

import: a GPT2LMHeadModel directory (config.json + weights; vocab.json/merges.txt recorded as the tokenizer when
present) becomes a checkpoint at iteration 0, ready for tools/eval_zeroshot.py, the lm-eval model, generation or
--finetune; a directory written by `export --format safetensors` (megatron_config.json inside) is imported back.
export: gpt2 (default for dense checkpoints) writes a directory GPT2LMHeadModel.from_pretrained loads, logits
equal to this model's; safetensors (default for MoE) writes model.safetensors + megatron_config.json.
Needs transformers (requirements-test.txt). Exit codes: 0 ok, 2 a bad flag, checkpoint or unsupported model (one
line on stderr).
"""
import argparse
import sys


from megatron import hf_interop
from megatron.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> checkpoint")
    imp.add_argument("--hf-dir", required=True, help="GPT2LMHeadModel directory, or a safetensors export of ours")
    imp.add_argument("--save", required=True, help="checkpoint root to create (must hold no checkpoint)")
    imp.add_argument("--vocab-file", default=None, help="GPT-2 vocab to record (default: HF_DIR/vocab.json)")
    imp.add_argument("--merge-file", default=None, help="GPT-2 merges to record (default: HF_DIR/merges.txt)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                     help="pad the vocabulary (default 1: exact, logits equal to GPT-2's; padded rows get logit 0)")
    exp = sub.add_parser("export", help="checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True, help="checkpoint root or iter_XXXXXXX directory (any TP size)")
    exp.add_argument("--save", required=True, help="output directory")
    exp.add_argument("--format", choices=["auto", "gpt2", "safetensors"], default="auto",
                     help="gpt2: GPT2LMHeadModel (dense only); safetensors: any model; auto: gpt2 if dense")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            out = hf_interop.import_any(args.hf_dir, args.save, vocab_file=args.vocab_file,
                                        merge_file=args.merge_file,
                                        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        else:
            fmt = args.format
            if fmt == "auto":
                _, configs = hf_interop.load_whole_model(args.load)
                fmt = "safetensors" if configs.get("moe") else "gpt2"
            out = (hf_interop.export_gpt2 if fmt == "gpt2" else hf_interop.export_safetensors)(args.load, args.save)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
