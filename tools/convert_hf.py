#!/usr/bin/env python
"""Hugging Face interop: GPT-2 (megatron/hf_interop.py) and the Llama-style families LlamaForCausalLM,
MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, DeepseekV3ForCausalLM
(megatron/hf/, docs/hf.md) in and out of this project's checkpoints.

    python tools/convert_hf.py import --hf-dir gpt2/ --save ckpt/gpt2 [--vocab-file V --merge-file M]
    python tools/convert_hf.py import --hf-dir Qwen3-30B-A3B/ --save ckpt/qwen3
    python tools/convert_hf.py export --load ckpt/run --save hf/run [--format gpt2|hf|safetensors]
        [--architecture Qwen3MoeForCausalLM] [--max-shard-size-gb 5] [--dtype float32|bfloat16]

import: a GPT2LMHeadModel directory (config.json + weights; vocab.json/merges.txt recorded as the tokenizer when
present) becomes a checkpoint at iteration 0, ready for tools/eval_zeroshot.py, the lm-eval model, generation or
--finetune; a directory written by `export --format safetensors` (megatron_config.json inside) is imported back.
The Llama-style families are read from config.json (transformers' config classes; every field that changes the
computation is mapped or refused in one line) and safetensors shards one tensor at a time; the tokenizer is
recorded as HuggingFaceTokenizer when the directory has tokenizer.json.
export: hf writes config.json + model.safetensors shards AutoModelForCausalLM loads (the architecture the
checkpoint was imported from, else the one its blocks imply; default when that exists); gpt2 (default for other
dense checkpoints) writes a GPT2LMHeadModel directory, logits equal to this model's; safetensors (default
otherwise) writes model.safetensors + megatron_config.json.
Needs transformers (requirements-test.txt). Exit codes: 0 ok, 2 a bad flag, checkpoint or unsupported model (one
line on stderr).
"""
import argparse
import os
import sys


from megatron import hf, hf_interop
from megatron.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> checkpoint")
    imp.add_argument("--hf-dir", required=True, help="a Hugging Face directory (GPT2LMHeadModel or a Llama-style "
                                                     "family), or a safetensors export of ours")
    imp.add_argument("--save", required=True, help="checkpoint root to create (must hold no checkpoint)")
    imp.add_argument("--vocab-file", default=None, help="GPT-2 vocab to record (default: HF_DIR/vocab.json)")
    imp.add_argument("--merge-file", default=None, help="GPT-2 merges to record (default: HF_DIR/merges.txt)")
    imp.add_argument("--tokenizer-model", default=None,
                     help="HuggingFaceTokenizer directory to record (default: HF_DIR when it has tokenizer.json)")
    imp.add_argument("--target-tp", type=int, default=1,
                     help="write TP shards for this --tensor-model-parallel-size (tools/checkpoint_tp.py)")
    imp.add_argument("--target-ep", type=int, default=1,
                     help="record this --expert-model-parallel-size (expert files are per expert, any EP reads them)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                     help="pad the vocabulary (default 1: exact, logits equal to GPT-2's; padded rows get logit 0)")
    exp = sub.add_parser("export", help="checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True, help="checkpoint root or iter_XXXXXXX directory (any TP size)")
    exp.add_argument("--save", required=True, help="output directory")
    exp.add_argument("--format", choices=["auto", "gpt2", "hf", "safetensors"], default="auto",
                     help="hf: a Llama-style family (--architecture); gpt2: GPT2LMHeadModel (dense only); "
                          "safetensors: any model; auto: hf if a family computes the model, else gpt2 if dense")
    exp.add_argument("--architecture", default=None, choices=sorted(hf.FAMILIES),
                     help="--format hf: the transformers architecture (default: recorded at import, else implied)")
    exp.add_argument("--max-shard-size-gb", type=float, default=5.0, help="--format hf: safetensors shard size")
    exp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="--format hf: dtype of the written weights")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            out = _import(args)
        else:
            fmt = args.format
            if fmt == "auto":
                fmt = _auto_format(args.load, args.architecture)
            if fmt == "hf":
                out = hf.export_hf(args.load, args.save, args.architecture,
                                   max_shard_bytes=int(args.max_shard_size_gb * 2 ** 30), dtype=args.dtype)
            else:
                out = (hf_interop.export_gpt2 if fmt == "gpt2" else hf_interop.export_safetensors)(args.load,
                                                                                                    args.save)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _import(args) -> str:
    from megatron.errors import ConfigError

    ours = os.path.isfile(os.path.join(args.hf_dir, hf_interop.MEGATRON_CONFIG))
    if (ours or hf.hf_architecture(args.hf_dir) == "GPT2LMHeadModel") and (args.target_tp, args.target_ep) != (1, 1):
        raise ConfigError("--target-tp/--target-ep apply to the Llama-style families; split a GPT-2 or safetensors "
                          "import with tools/checkpoint_tp.py")
    if ours:
        return hf_interop.import_safetensors(args.hf_dir, args.save)
    if hf.hf_architecture(args.hf_dir) == "GPT2LMHeadModel":
        return hf_interop.import_gpt2(args.hf_dir, args.save, vocab_file=args.vocab_file, merge_file=args.merge_file,
                                      make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    if args.target_tp == 1:
        return hf.import_hf(args.hf_dir, args.save, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                            tokenizer_model=args.tokenizer_model, target_ep=args.target_ep)
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("checkpoint_tp_tool",
                                                  os.path.join(os.path.dirname(__file__), "checkpoint_tp.py"))
    tp_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp_tool)
    tmp = os.path.join(args.save, ".import_tp1")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.import_hf(args.hf_dir, tmp, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                     tokenizer_model=args.tokenizer_model, target_ep=args.target_ep, target_tp=args.target_tp)
        out = tp_tool.convert(tmp, args.save, args.target_tp, true_vocab_size=hf.hf_vocab_size(args.hf_dir))
        shutil.copyfile(os.path.join(tmp, hf.FLAGS_FILE), os.path.join(args.save, hf.FLAGS_FILE))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _auto_format(load: str, architecture) -> str:
    """hf when a Llama-style family computes the checkpoint's model, else gpt2 for dense, safetensors for MoE."""
    from megatron.checkpointing import model_configs_from_checkpoint
    from megatron.errors import ConfigError
    from megatron.hf.configs import infer_architecture, to_hf

    from megatron import checkpointing

    ckpt_dir, _ = checkpointing.resolve_checkpoint_dir(load)  # TP rank 0's dense file (mapped): the configs decide
    payload = checkpointing.load_checkpoint_file(ckpt_dir, checkpointing.dense_path(ckpt_dir, 0), mmap=True)
    configs = payload.get("configs") or {}
    cfg, moe = model_configs_from_checkpoint(configs, ckpt_dir)
    arch = architecture or ((configs.get("hf_config") or {}).get("architectures") or [None])[0]
    try:
        to_hf(cfg, moe, arch if arch in hf.FAMILIES else infer_architecture(cfg, moe))
        return "hf"
    except ConfigError:
        return "safetensors" if configs.get("moe") else "gpt2"


if __name__ == "__main__":
    sys.exit(main())
