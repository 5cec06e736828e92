"""Tensor-parallel checkpoint shards put together (and cut again): used by one-process loaders (generation,
evaluation, a distillation teacher), which read any TP size whole, and by tools/checkpoint_tp.py.

Which tensors are sharded, along which dimension and with which stride (fused QKV: 3) is read from the model the
checkpoint's configuration builds on the meta device (nothing is allocated), never guessed from names. Adam state
follows its parameter.
"""
from typing import Dict, List, Optional, Tuple

import torch

from megatron.checkpointing.layout import num_tp_shards, resolve_checkpoint_dir
from megatron.checkpointing.read import load_dense
from megatron.errors import CheckpointError
from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.tensor_parallel import merge_partitions, partition
from moe.config import MoEConfig

EMBEDDING = "word_embeddings.weight"


def model_configs_from_checkpoint(configs: dict, ckpt_dir: str,
                                  moe_overrides: Optional[dict] = None) -> Tuple[ModelConfig, Optional[MoEConfig]]:
    """(ModelConfig, MoEConfig or None) recorded in a checkpoint's `configs`, for one process (EP size 1)."""
    if "model" not in configs:
        raise CheckpointError(f"{ckpt_dir}: no model configuration recorded; not a megatron-moe checkpoint")
    mcfg = ModelConfig.from_recorded(configs["model"])
    moe_cfg = None
    if configs.get("moe"):
        try:  # moe/ raises ValueError (it cannot import megatron.errors); the values came from this checkpoint
            moe_cfg = MoEConfig.from_recorded(configs["moe"], **{**(moe_overrides or {}), "ep_size": 1})  # one process
        except ValueError as e:
            raise CheckpointError(f"{ckpt_dir}: recorded MoE configuration rejected: {e}") from None
    return mcfg, moe_cfg


def partition_layout(configs: dict, ckpt_dir: str) -> Dict[str, Tuple[int, int]]:
    """{parameter name: (dim, stride)} of every tensor-parallel-sharded parameter of the recorded model."""
    mcfg, moe_cfg = model_configs_from_checkpoint(configs, ckpt_dir)
    with torch.device("meta"):
        model = GPTModel(mcfg, moe_cfg, None)
    return {n: (p.partition_dim, getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()
            if getattr(p, "partition_dim", None) is not None}


def resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Cut to `rows`, or extend by repeating the last row (Megatron's checkpoint_util for padded vocabularies)."""
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat((t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])))


def _map_tensors(payload: dict, fn) -> dict:
    """payload with fn(name, tensor) applied to every model tensor and every per-parameter Adam tensor."""
    out = dict(payload)
    out["model"] = {k: fn(k, v) for k, v in payload["model"].items()}
    out["optimizer"] = {n: {k: (fn(n, v) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
                        for n, st in (payload.get("optimizer") or {}).items()}
    return out


def merge_shards(shards: List[dict], layout: Dict[str, Tuple[int, int]], vocab_rows: Optional[int] = None) -> dict:
    """One TP=1 payload from every rank's dense payload (rank order); embedding rows resized to `vocab_rows`."""
    by_rank = [s["model"] for s in shards]
    opt_by_rank = [s.get("optimizer") or {} for s in shards]

    def whole(name, tensors):
        t = tensors[0]
        if name in layout and len(tensors) > 1:
            dim, stride = layout[name]
            t = merge_partitions(tensors, dim, stride)
        return resize_rows(t, vocab_rows) if name == EMBEDDING and vocab_rows is not None else t

    out = dict(shards[0])
    out["model"] = {k: whole(k, [m[k] for m in by_rank]) for k in by_rank[0]}
    out["optimizer"] = {n: {k: (whole(n, [o[n][k] for o in opt_by_rank]) if torch.is_tensor(v) and v.dim() > 0
                                else v) for k, v in st.items()} for n, st in opt_by_rank[0].items()}
    configs = dict(out.get("configs") or {})
    if "model" in configs:
        configs["model"] = dict(configs["model"], padded_vocab_size=out["model"][EMBEDDING].shape[0])
    configs["parallel"] = {"tensor_model_parallel_size": 1}
    out["configs"] = configs
    out["rng"] = {k: v for k, v in (out.get("rng") or {}).items() if k != "tensor_parallel"}
    return out


def shard(whole: dict, layout: Dict[str, Tuple[int, int]], rank: int, size: int) -> dict:
    """Rank `rank`'s payload of `size` from a TP=1 payload."""
    def cut(name, t):
        if name not in layout or size == 1:
            return t.clone()
        dim, stride = layout[name]
        return partition(t, dim, rank, size, stride)

    out = _map_tensors(whole, cut)
    out["configs"] = dict(whole.get("configs") or {}, parallel={"tensor_model_parallel_size": size})
    return out


def load_dense_whole(load: str) -> Tuple[dict, str]:
    """The dense payload of a checkpoint of any TP size, as one process's (TP=1): shards merged in memory."""
    ckpt_dir, _ = resolve_checkpoint_dir(load)
    n = num_tp_shards(ckpt_dir)
    if n <= 1:
        return load_dense(load)
    shards = [load_dense(load, r, n)[0] for r in range(n)]
    layout = partition_layout(shards[0].get("configs") or {}, ckpt_dir)
    return merge_shards(shards, layout), ckpt_dir
