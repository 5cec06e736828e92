"""Converts a checkpoint to another tensor-parallel size (merges mp_rank_XX shards, or splits them), like
Megatron-LM's tools/checkpoint_util for the TP dimension.

    python tools/checkpoint_tp.py --load CKPT [--iteration N] --save OUT --target-tp 1 [--true-vocab-size V]

Which tensors are sharded, along which dimension and with which stride (fused QKV: 3) is read from the model the
checkpoint's configuration builds (on the meta device, so nothing is allocated), never guessed from names. Adam
state follows its parameter. The padded vocabulary depends on the TP size (padding to a multiple of
--make-vocab-size-divisible-by x TP); embedding rows are cut to, or extended (by repeating the last row, as
Megatron does) to, the target's padding of the true vocabulary size, taken from the recorded tokenizer unless
--true-vocab-size is given. Expert files (one per MoE layer and expert at any TP size) are copied. Iteration, counters, scheduler
and RNG state are kept (the per-TP-rank dropout streams restart from their seeds). Writes OUT/iter_XXXXXXX and
OUT/latest_checkpointed_iteration.txt; refuses to overwrite.
"""
import argparse
import os
import re
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron import checkpointing  # noqa: E402
from megatron.inference import model_configs_from_checkpoint  # noqa: E402
from megatron.model import GPTModel  # noqa: E402
from megatron.tensor_parallel import merge_partitions, partition  # noqa: E402


class ConvertError(Exception):
    pass


def partition_layout(configs: dict, ckpt_dir: str) -> dict:
    """{parameter name: (dim, stride)} of every tensor-parallel-sharded parameter of the recorded model."""
    mcfg, moe_cfg = model_configs_from_checkpoint(configs, ckpt_dir)
    with torch.device("meta"):
        model = GPTModel(mcfg, moe_cfg, None)
    return {n: (p.partition_dim, getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()
            if getattr(p, "partition_dim", None) is not None}


def _true_vocab_size(configs: dict, given):
    if given:
        return given
    from megatron.tokenizer import build_tokenizer

    t = configs.get("tokenizer") or {}
    try:
        return build_tokenizer(t["tokenizer_type"], vocab_file=t.get("vocab_file"), merge_file=t.get("merge_file"),
                               tokenizer_model=t.get("tokenizer_model")).vocab_size
    except Exception as e:  # noqa: BLE001 - any failure: the files moved; the user can name the size
        raise ConvertError(f"cannot rebuild the recorded tokenizer to learn the vocabulary size ({e}); "
                           f"pass --true-vocab-size") from None


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat((t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])))


def convert(load: str, save: str, target_tp: int, true_vocab_size=None) -> str:
    from megatron.tokenizer import pad_vocab_size

    ckpt_dir, iteration = checkpointing.resolve_checkpoint_dir(load)
    src_tp = len([d for d in os.listdir(ckpt_dir) if re.fullmatch(r"mp_rank_\d\d", d)])
    if src_tp == 0:
        raise ConvertError(f"--load {ckpt_dir}: no mp_rank_XX directories")
    shards = [checkpointing._torch_load(checkpointing.dense_path(ckpt_dir, r)) for r in range(src_tp)]
    configs = dict(shards[0].get("configs") or {})
    layout = partition_layout(configs, ckpt_dir)
    model_cfg = dict(configs["model"])
    vocab = _true_vocab_size(configs, true_vocab_size)
    divisible = (configs.get("tokenizer") or {}).get("make_vocab_size_divisible_by", 128)
    new_vocab = pad_vocab_size(vocab, divisible, target_tp)
    for what, value in (("--num-attention-heads", model_cfg["num_attention_heads"]),
                        ("--ffn-hidden-size", model_cfg["ffn_hidden_size"])):
        if value % target_tp:
            raise ConvertError(f"--target-tp {target_tp}: {what} ({value}) is not divisible by it")

    def full(name, tensors):
        if name not in layout:
            return tensors[0]
        dim, stride = layout[name]
        t = merge_partitions(tensors, dim, stride) if src_tp > 1 else tensors[0]
        return _resize_rows(t, new_vocab) if name == "word_embeddings.weight" else t

    def split(name, t, rank):
        if name not in layout or target_tp == 1:
            return t.clone()
        dim, stride = layout[name]
        return partition(t, dim, rank, target_tp, stride)

    model_full = {k: full(k, [s["model"][k] for s in shards]) for k in shards[0]["model"]}
    optim_full = {}
    for name, state in (shards[0].get("optimizer") or {}).items():
        optim_full[name] = {k: (full(name, [s["optimizer"][name][k] for s in shards])
                                if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in state.items()}

    final = checkpointing.iter_dir(save, iteration)
    if os.path.exists(final):
        raise ConvertError(f"--save {save}: {final} already exists; choose an empty directory")
    tmp = os.path.join(save, f".tmp_convert_{iteration:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model_cfg["padded_vocab_size"] = new_vocab
    configs.update(model=model_cfg, parallel={"tensor_model_parallel_size": target_tp})
    rng = {k: v for k, v in (shards[0].get("rng") or {}).items() if k != "tensor_parallel"}
    for r in range(target_tp):
        payload = dict(shards[0], model={k: split(k, v, r) for k, v in model_full.items()},
                       optimizer={n: {k: (split(n, v, r) if torch.is_tensor(v) and v.dim() > 0 else v)
                                      for k, v in st.items()} for n, st in optim_full.items()},
                       configs=configs, rng=rng)
        os.makedirs(os.path.dirname(checkpointing.dense_path(tmp, r)), exist_ok=True)
        torch.save(payload, checkpointing.dense_path(tmp, r))
    for f in sorted(os.listdir(ckpt_dir)):  # experts are replicated over TP: one file each serves every rank
        if re.fullmatch(r"layer_\d+_expert_\d+_mp_rank_00_model_states\.pt", f):
            shutil.copyfile(os.path.join(ckpt_dir, f), os.path.join(tmp, f))
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
    except (ConvertError, checkpointing.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (tensor-parallel size {args.target_tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
