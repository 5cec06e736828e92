"""Converts a checkpoint to another tensor-parallel size (merges mp_rank_XX shards, or splits them), like
Megatron-LM's tools/checkpoint_util for the TP dimension.

    python tools/checkpoint_tp.py --load CKPT --save OUT --target-tp 1 [--true-vocab-size V]

Only training at another TP size needs this: one-process loaders (tools/generate.py, tools/eval_zeroshot.py,
a distillation teacher) merge shards in memory. The merging and cutting live in megatron/checkpointing/tp_shards.py.
The padded vocabulary depends on the TP size (a multiple of --make-vocab-size-divisible-by x TP): embedding
rows are cut to, or extended (repeating the last row, as Megatron does) to, the target's padding of the true
vocabulary size, taken from the recorded tokenizer unless --true-vocab-size is given. Expert files (one per MoE
layer and expert at any TP size) are copied. Iteration, counters, scheduler and RNG state are kept (the per-rank
dropout streams restart from their seeds). Writes OUT/iter_XXXXXXX and OUT/latest_checkpointed_iteration.txt;
refuses to overwrite.
"""
import argparse
import os
import re
import shutil
import sys

import torch

from megatron import checkpointing
from megatron.checkpointing.tp_shards import merge_shards, partition_layout, shard
from megatron.errors import UserError


class ConvertError(UserError):
    """A conversion the flags ask for that cannot be done: one line naming the flag, exit 2."""


def _true_vocab_size(configs: dict, given):
    if given:
        return given
    from megatron.tokenizer import build_tokenizer

    t = configs.get("tokenizer") or {}
    try:
        return build_tokenizer(t["tokenizer_type"], vocab_file=t.get("vocab_file"), merge_file=t.get("merge_file"),
                               tokenizer_model=t.get("tokenizer_model")).vocab_size
    except (UserError, KeyError) as e:  # the recorded files moved (or no type was recorded): the user can name it
        raise ConvertError(f"cannot rebuild the recorded tokenizer to learn the vocabulary size ({e}); "
                           f"pass --true-vocab-size") from None


def convert(load: str, save: str, target_tp: int, true_vocab_size=None) -> str:
    from megatron.tokenizer import pad_vocab_size

    ckpt_dir, iteration = checkpointing.resolve_checkpoint_dir(load)
    src_tp = checkpointing.num_tp_shards(ckpt_dir)
    if src_tp == 0:
        raise ConvertError(f"--load {ckpt_dir}: no mp_rank_XX directories")
    shards = [checkpointing.load_dense(load, r, src_tp)[0] for r in range(src_tp)]
    configs = shards[0].get("configs") or {}
    model_cfg = configs.get("model") or {}
    for what, key in (("--num-attention-heads", "num_attention_heads"), ("--ffn-hidden-size", "ffn_hidden_size")):
        if model_cfg.get(key, 0) % target_tp:
            raise ConvertError(f"--target-tp {target_tp}: {what} ({model_cfg[key]}) is not divisible by it")
    layout = partition_layout(configs, ckpt_dir)
    divisible = (configs.get("tokenizer") or {}).get("make_vocab_size_divisible_by", 128)
    rows = pad_vocab_size(_true_vocab_size(configs, true_vocab_size), divisible, target_tp)
    whole = merge_shards(shards, layout, vocab_rows=rows)

    final = checkpointing.iter_dir(save, iteration)
    if os.path.exists(final):
        raise ConvertError(f"--save {save}: {final} already exists; choose an empty directory")
    tmp = os.path.join(save, f".tmp_convert_{iteration:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise ConvertError(f"--save {save}: cannot create {tmp} ({e.strerror}); give a writable directory") from None
    for r in range(target_tp):
        os.makedirs(os.path.dirname(checkpointing.dense_path(tmp, r)), exist_ok=True)
        torch.save(shard(whole, layout, r, target_tp), checkpointing.dense_path(tmp, r))
    for f in sorted(os.listdir(ckpt_dir)):  # expert files do not depend on TP (one per expert and ETP rank)
        if re.fullmatch(r"layer_\d+_expert_\d+_mp_rank_\d\d_model_states\.pt", f):
            shutil.copyfile(os.path.join(ckpt_dir, f), os.path.join(tmp, f))
    checkpointing.write_manifest_of(tmp, iteration)  # the converted checkpoint is verified at load like any other
    os.replace(tmp, final)
    with open(os.path.join(save, checkpointing.TRACKER), "w") as fh:
        fh.write(str(iteration))
    return final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint root (with the tracker) or an iter_XXXXXXX directory")
    ap.add_argument("--save", required=True, help="output root; must not hold the same iteration already")
    ap.add_argument("--target-tp", type=int, required=True, help="tensor-parallel size to convert to")
    ap.add_argument("--true-vocab-size", type=int, default=None,
                    help="tokenizer vocabulary size (default: rebuild the recorded tokenizer)")
    args = ap.parse_args(argv)
    if args.target_tp < 1:
        print("error: --target-tp must be >= 1", file=sys.stderr)
        return 2
    try:
        out = convert(args.load, args.save, args.target_tp, args.true_vocab_size)
    except UserError as e:  # ConvertError, CheckpointError, ...; a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (tensor-parallel size {args.target_tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
