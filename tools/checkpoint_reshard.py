"""Reshards a checkpoint to another tensor- and pipeline-parallel size: merges the mp_rank_XX[_YYY] files of every
(TP, PP) rank into the whole dense state, then cuts it for the target, like Megatron-LM's tools/checkpoint_util.

    python tools/checkpoint_reshard.py --load CKPT --save OUT --target-tp 1 --target-pp 2 [--true-vocab-size V]
        [--num-layers-per-virtual-pipeline-stage N | --decoder-first-pipeline-num-layers F
         --decoder-last-pipeline-num-layers L]

Training at another PP size does not need this (loading merges the stages' files and keeps its own part:
megatron/checkpointing/read.py), nor do one-process loaders (tools/generate.py, tools/eval_zeroshot.py, a
distillation teacher), which merge TP shards and PP stages in memory. Parameter names carry global layer indices at
every PP size, so a stage's file holds the entries of its layers (megatron/pipeline/layout.py splits them as the
training flags do: pass the same virtual/uneven flags), the embedding on the first stage, final norm and head on the
last, and the tied word embedding on both. The TP merging and cutting live in megatron/checkpointing/tp_shards.py.
The padded vocabulary depends on the TP size (a multiple of --make-vocab-size-divisible-by x TP): embedding
rows are cut to, or extended (repeating the last row, as Megatron does) to, the target's padding of the true
vocabulary size, taken from the recorded tokenizer unless --true-vocab-size is given. Expert files (one per MoE
layer and global expert at any TP/PP size) are copied. Iteration, counters, scheduler and RNG state are kept (the
per-rank dropout streams restart from their seeds; every target stage gets stage 0's RNG state). Writes
OUT/iter_XXXXXXX and OUT/latest_checkpointed_iteration.txt; refuses to overwrite. tools/checkpoint_tp.py is this
tool with --target-pp 1.
"""
import argparse
import os
import re
import shutil
import sys

import torch

from megatron import checkpointing
from megatron.checkpointing.tp_shards import merge_shards, partition_layout, shard
from megatron.errors import ConfigError, UserError
from megatron.pipeline.layout import stage_layers


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


def stage_keys(keys, rank_layers, first: bool, last: bool, tied: bool):
    """The entries of the whole dense state one pipeline stage holds: its layers (`layers.<i>.`), the embedding on
    the first stage, final norm and head on the last (and the tied word embedding there too); anything else (no
    layer, no embedding, no head) on every stage."""
    out = []
    for k in keys:
        m = re.match(r"layers\.(\d+)\.", k)
        if m:
            keep = int(m.group(1)) in rank_layers
        elif k.startswith("word_embeddings."):
            keep = first or (last and tied)
        elif k.startswith("position_embeddings."):
            keep = first
        elif k.startswith(("final_layernorm.", "output_layer.")):
            keep = last
        else:
            keep = True
        if keep:
            out.append(k)
    return out


def _stage_split(model_cfg: dict, target_pp: int, virtual, first, last):
    """[pp rank] -> set of global layer ids (megatron/pipeline/layout.py; ConvertError for a split that does not
    exist)."""
    try:
        ranks = stage_layers(model_cfg["num_layers"], target_pp, virtual, first, last)
    except ConfigError as e:
        raise ConvertError(f"--target-pp {target_pp}: {e}") from None
    return [{i for chunk in chunks for i in chunk} for chunks in ranks]


def _write_dense(tmp: str, whole: dict, layout, target_tp: int, target_pp: int, split) -> None:
    tied = not any(k.startswith("output_layer.") for k in whole.get("model", {}))
    for r in range(target_tp):
        tp_part = shard(whole, layout, r, target_tp)
        for p in range(target_pp):
            part = dict(tp_part)
            if target_pp > 1:
                for key in ("model", "optimizer"):
                    src = tp_part.get(key) or {}
                    part[key] = {k: src[k] for k in stage_keys(src, split[p], p == 0, p == target_pp - 1, tied)}
                part["configs"] = dict(part.get("configs") or {})
                part["configs"]["parallel"] = dict(part["configs"].get("parallel") or {},
                                                   pipeline_model_parallel_size=target_pp)
            path = checkpointing.dense_path(tmp, r, p if target_pp > 1 else None)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(part, path)


def convert(load: str, save: str, target_tp: int, true_vocab_size=None, target_pp: int = 1,
            layers_per_virtual_stage=None, first_stage_layers=None, last_stage_layers=None) -> str:
    from megatron.tokenizer import pad_vocab_size

    ckpt_dir, iteration = checkpointing.resolve_checkpoint_dir(load)
    src_tp = checkpointing.num_tp_shards(ckpt_dir)
    if src_tp == 0:
        raise ConvertError(f"--load {ckpt_dir}: no mp_rank_XX directories")
    shards = [checkpointing.load_dense(load, r, src_tp)[0] for r in range(src_tp)]  # PP stages merged
    configs = shards[0].get("configs") or {}
    model_cfg = configs.get("model") or {}
    for what, key in (("--num-attention-heads", "num_attention_heads"), ("--ffn-hidden-size", "ffn_hidden_size")):
        if model_cfg.get(key, 0) % target_tp:
            raise ConvertError(f"--target-tp {target_tp}: {what} ({model_cfg[key]}) is not divisible by it")
    layout = partition_layout(configs, ckpt_dir)
    divisible = (configs.get("tokenizer") or {}).get("make_vocab_size_divisible_by", 128)
    rows = pad_vocab_size(_true_vocab_size(configs, true_vocab_size), divisible, target_tp)
    whole = merge_shards(shards, layout, vocab_rows=rows)
    split = (_stage_split(model_cfg, target_pp, layers_per_virtual_stage, first_stage_layers, last_stage_layers)
             if target_pp > 1 else None)

    final = checkpointing.iter_dir(save, iteration)
    if os.path.exists(final):
        raise ConvertError(f"--save {save}: {final} already exists; choose an empty directory")
    tmp = os.path.join(save, f".tmp_convert_{iteration:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise ConvertError(f"--save {save}: cannot create {tmp} ({e.strerror}); give a writable directory") from None
    _write_dense(tmp, whole, layout, target_tp, target_pp, split)
    for f in sorted(os.listdir(ckpt_dir)):  # expert files do not depend on TP/PP (one per expert and ETP rank)
        if re.fullmatch(r"layer_\d+_expert_\d+_mp_rank_\d\d_model_states\.pt", f):
            shutil.copyfile(os.path.join(ckpt_dir, f), os.path.join(tmp, f))
    checkpointing.write_manifest_of(tmp, iteration)  # the converted checkpoint is verified at load like any other
    os.replace(tmp, final)
    with open(os.path.join(save, checkpointing.TRACKER), "w") as fh:
        fh.write(str(iteration))
    return final


def main(argv=None, pipeline: bool = True, convert_fn=None) -> int:
    """The CLI; `pipeline` False: tools/checkpoint_tp.py's flags (no PP), `convert_fn` its convert."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="checkpoint root (with the tracker) or an iter_XXXXXXX directory")
    ap.add_argument("--save", required=True, help="output root; must not hold the same iteration already")
    ap.add_argument("--target-tp", type=int, required=True, help="tensor-parallel size to convert to")
    ap.add_argument("--true-vocab-size", type=int, default=None,
                    help="tokenizer vocabulary size (default: rebuild the recorded tokenizer)")
    if pipeline:
        ap.add_argument("--target-pp", type=int, default=1, help="pipeline-parallel size to convert to")
        ap.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                        help="the training flag of the target (interleaved stages)")
        ap.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                        help="the training flag of the target (uneven first stage)")
        ap.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                        help="the training flag of the target (uneven last stage)")
    args = ap.parse_args(argv)
    target_pp = getattr(args, "target_pp", 1)
    for flag, value in (("--target-tp", args.target_tp), ("--target-pp", target_pp)):
        if value < 1:
            print(f"error: {flag} must be >= 1", file=sys.stderr)
            return 2
    try:
        out = (convert_fn or convert)(args.load, args.save, args.target_tp, args.true_vocab_size, target_pp,
                      getattr(args, "num_layers_per_virtual_pipeline_stage", None),
                      getattr(args, "decoder_first_pipeline_num_layers", None),
                      getattr(args, "decoder_last_pipeline_num_layers", None))
    except UserError as e:  # ConvertError, CheckpointError, ...; a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (tensor-parallel size {args.target_tp}, pipeline-parallel size {target_pp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
