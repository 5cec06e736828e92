"""NVMe expert offload wired into a GPT checkpoint: the expert store written from a checkpoint's expert files, a
model whose MoE layers read their experts through the cache, gate prefetch hooks, and the run's statistics.

Experts are never materialised in memory: the model is built on the meta device, its experts replaced by
moe.offload.OffloadedExperts, and only the dense weights are loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Iterator, Mapping, Optional, Tuple

import torch

from megatron import checkpointing
from megatron.errors import ConfigError, UserError
from moe.layer import MoELayer
from moe.offload import (ExpertCache, ExpertStore, GatePrefetcher, OffloadConfig, OffloadedExperts, OffloadError,
                         parse_bytes, write_store)

logger = logging.getLogger(__name__)
# what a CLI that can offload reports as one line (exit 2): the project's errors and moe.offload's own, which
# cannot derive from megatron.errors because moe/ never imports megatron/
USER_ERRORS = (UserError, OffloadError)
RECORD_TENSORS = (("w1_FD", "experts.w1_eFD"), ("b1_F", "experts.b1_eF"), ("w2_DF", "experts.w2_eDF"),
                  ("b2_D", "experts.b2_eD"))


def moe_layer_sizes(configs: dict) -> Tuple[int, ...]:
    """Experts of each MoE layer of the checkpoint's model, in order."""
    if not configs.get("moe"):
        return ()
    from moe.config import MoEConfig

    plan = MoEConfig.from_recorded(configs["moe"]).layer_plan(configs["model"]["num_layers"])
    return tuple(spec.num_experts for spec in plan if spec is not None)


def checkpoint_source(ckpt_dir: str, iteration: int, configs: dict) -> dict:
    """What identifies the experts of a checkpoint: iteration, architecture and a fingerprint of its expert files
    (their sizes and the xxh3 of their first and last MiB: cheap, and different for different weights)."""
    import xxhash

    h = xxhash.xxh3_64()
    for m, n in enumerate(moe_layer_sizes(configs)):
        for e in range(n):
            path = checkpointing.expert_path(ckpt_dir, m, e)
            if not os.path.isfile(path):
                raise checkpointing.CheckpointError(f"checkpoint file {path} is missing")
            size = os.path.getsize(path)
            h.update(f"{m}/{e}/{size};".encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(size - (1 << 20))
                    h.update(f.read(1 << 20))
    moe = configs.get("moe") or {}
    return {"iteration": int(iteration), "num_experts": list(moe_layer_sizes(configs)),
            "hidden_size": configs["model"]["hidden_size"], "ffn_hidden_size": configs["model"]["ffn_hidden_size"],
            "expert_interval": moe.get("expert_interval"), "fingerprint": h.hexdigest()}


def _records(ckpt_dir: str, configs: dict) -> Iterator[Tuple[int, int, Mapping[str, torch.Tensor]]]:
    """(MoE layer, expert, record tensors) from the checkpoint's per-expert files, one file in memory at a time."""
    for m, n in enumerate(moe_layer_sizes(configs)):
        for e in range(n):
            path = checkpointing.expert_path(ckpt_dir, m, e)
            weights = checkpointing.read_whole_expert(ckpt_dir, m, e)["model"]  # ETP shards merged
            missing = [src for _, src in RECORD_TENSORS if src not in weights]
            if missing:
                raise checkpointing.CheckpointError(f"{path}: lacks {missing[0]} (offload supports the built-in "
                                                    f"GELU MLP experts)")
            # in the dtype the checkpoint holds them (the model casts to its compute dtype when it runs them)
            yield m, e, {name: weights[src] for name, src in RECORD_TENSORS}


def write_expert_store(load: str, out: str) -> ExpertStore:
    """tools/offload_experts.py: the store of checkpoint `load`'s experts in `out` (refused if `out` holds files)."""
    ckpt_dir, iteration = checkpointing.resolve_checkpoint_dir(load)
    configs = checkpointing.load_dense_whole(ckpt_dir)[0].get("configs") or {}
    if not configs.get("moe"):
        raise OffloadError(f"--load {load}: a dense checkpoint has no experts to offload")
    if os.path.isdir(out) and os.listdir(out):
        raise OffloadError(f"--out {out}: directory is not empty; give a new or empty directory")
    source = checkpoint_source(ckpt_dir, iteration, configs)
    t0 = time.perf_counter()
    store = write_store(out, _records(ckpt_dir, configs), source, checkpoint=os.path.abspath(ckpt_dir))
    logger.info("expert store: %d records, %.1f MB written to %s in %.1f s", len(store.records),
                store.total_bytes() / 1e6, out, time.perf_counter() - t0)
    return store


def open_or_write_store(ckpt_dir: str, iteration: int, configs: dict, directory: str) -> ExpertStore:
    """The store in `directory` for this checkpoint: written now when the directory is missing or empty,
    otherwise opened and checked (foreign or stale stores are refused with one line). A store written from a
    Hugging Face directory (`--hf-dir`) is accepted for a checkpoint imported from it: see check_hf_store."""
    if os.path.isdir(directory) and os.listdir(directory):
        store = ExpertStore.open(directory)
        if "hf_dir" in store.source:
            check_hf_store(store, ckpt_dir, configs)
            return store
    source = checkpoint_source(ckpt_dir, iteration, configs)
    if not os.path.isdir(directory) or not os.listdir(directory):
        logger.info("--moe-expert-store %s is empty: writing the expert store from %s", directory, ckpt_dir)
        write_store(directory, _records(ckpt_dir, configs), source, checkpoint=os.path.abspath(ckpt_dir))
    return ExpertStore.open(directory, expected_source=source)


# ------------------------------------------------------------------ the store straight from Hugging Face safetensors
def hf_source(hf_dir: str, reader, arch: str, cfg, moe) -> dict:
    """What identifies a store written from `hf_dir`: its architecture, expert shapes and a fingerprint of its
    safetensors shards (names, sizes, the header of each: every tensor's name, dtype, shape and offsets)."""
    import struct

    import xxhash

    h = xxhash.xxh3_64()
    for shard in sorted(set(reader.where.values())):
        path = os.path.join(hf_dir, shard)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            h.update(f"{shard};{os.path.getsize(path)};".encode())
            h.update(f.read(min(n, 100 << 20)))
    plan = moe.layer_plan(cfg.num_layers)
    return {"hf_dir": os.path.abspath(hf_dir), "architecture": arch,
            "num_experts": [spec.num_experts for spec in plan if spec is not None],
            "hidden_size": cfg.hidden_size, "moe_ffn_hidden_size": moe.moe_ffn_hidden_size or cfg.ffn_hidden_size,
            "fingerprint": h.hexdigest()}


def hf_records(reader, cfg, moe, arch: str) -> Iterator[Tuple[int, int, Mapping[str, torch.Tensor]]]:
    """(MoE layer, expert, record tensors) read from safetensors one expert at a time through megatron.hf's name
    mapping, in the weights' own dtype (the zero biases the importer adds are written in that dtype too); what the
    importer writes into the checkpoint's expert files (megatron.hf.weights.import_experts), record for record.

    The Hub's per-expert form is read straight into the record buffer (gate and up into w1's two halves, down into
    w2: moe.offload.store.Filler, one positioned read each, no intermediate copy); transformers 5's fused form and
    experts whose tensors differ in dtype go through import_experts itself."""
    from megatron.hf.configs import FAMILIES
    from megatron.hf.weights import _expert_names, import_experts
    from moe.offload.store import Filler

    fam, f, h = FAMILIES[arch], moe.moe_ffn_hidden_size or cfg.ffn_hidden_size, cfg.hidden_size
    layers = [(i, spec) for i, spec in enumerate(moe.layer_plan(cfg.num_layers)) if spec is not None]
    names = [(spec.moe_index, e, _expert_names(fam, f"model.layers.{i}.", e)) for i, spec in layers
             for e in range(spec.num_experts)]
    direct = all(all(n in reader for n in gud) for _, _, gud in names)  # the per-expert form throughout
    metas = {}
    if direct:
        for _, _, gud in names:
            for n, want in zip(gud, ((f, h), (f, h), (h, f))):
                dtype, shape = metas[n] = reader.meta(n)  # a dtype the store cannot hold: refused here, named
                if shape != want:
                    raise ConfigError(f"--hf-dir {reader.hf_dir}: {n} {shape} does not fit the config ({want})")
        direct = all(len({metas[n][0] for n in gud}) == 1 for _, _, gud in names)
    if not direct:
        for m, e, w in import_experts(reader, cfg, moe, arch):
            dtype = w["experts.w1_eFD"].dtype
            yield m, e, {name: (w[src] if name.startswith("w") else w[src].to(dtype)) for name, src in RECORD_TENSORS}
        return
    for m, e, (g, u, d) in names:
        dtype = metas[g][0]

        def w1(view, g=g, u=u):
            half = view.numel() // 2
            reader.read_into(g, view[:half])
            reader.read_into(u, view[half:])
        yield m, e, {"w1_FD": Filler((2 * f, h), dtype, w1), "b1_F": torch.zeros(2 * f, dtype=dtype),
                     "w2_DF": Filler((h, f), dtype, lambda view, d=d: reader.read_into(d, view)),
                     "b2_D": torch.zeros(h, dtype=dtype)}


def write_hf_expert_store(hf_dir: str, out: str) -> ExpertStore:
    """tools/offload_experts.py --hf-dir: the expert store of a Hugging Face MoE directory (one of megatron.hf's
    families) written from its safetensors one tensor at a time, no model built; records keep the weights' dtype."""
    from megatron.hf import FAMILIES, hf_architecture
    from megatron.hf.configs import from_hf
    from megatron.hf.weights import SafetensorsReader
    from megatron.hf_interop import _transformers
    from moe.offload.store import STORE_DTYPES

    arch = hf_architecture(hf_dir)
    if arch not in FAMILIES:
        raise ConfigError(f"--hf-dir {hf_dir}: architecture {arch!r} is not supported by the expert store; "
                          f"supported: {', '.join(a for a, f in FAMILIES.items() if f != 'llama')}")
    hf_cfg = _transformers().AutoConfig.from_pretrained(hf_dir)
    if getattr(hf_cfg, "quantization_config", None):
        raise ConfigError(f"--hf-dir {hf_dir}: quantization_config ({hf_cfg.quantization_config.get('quant_method')}"
                          f" weights) is not supported; dequantize to bf16/fp32 first")
    cfg, moe = from_hf(hf_cfg, arch)
    if moe is None:
        raise OffloadError(f"--hf-dir {hf_dir}: {arch} is a dense model; it has no experts to offload")
    if os.path.isdir(out) and os.listdir(out):
        raise OffloadError(f"--out {out}: directory is not empty; give a new or empty directory")
    reader = SafetensorsReader(hf_dir, keep_dtypes=STORE_DTYPES)
    try:
        t0 = time.perf_counter()
        # reads on 4 threads (positioned reads of several records in flight: the disk's queue stays busy) while
        # this thread hashes and writes (O_DIRECT) the records in order
        store = write_store(out, hf_records(reader, cfg, moe, arch), hf_source(hf_dir, reader, arch, cfg, moe),
                            checkpoint=os.path.abspath(hf_dir), fill_threads=4)
    finally:
        reader.close()
    logger.info("expert store: %d records, %.1f MB written from %s to %s in %.1f s", len(store.records),
                store.total_bytes() / 1e6, hf_dir, out, time.perf_counter() - t0)
    return store


def _read_record(store: ExpertStore, key: Tuple[int, int]) -> Mapping[str, torch.Tensor]:
    from moe.offload.store import tensor_views

    rec = store.records[key]
    with open(store.data_path, "rb") as f:
        f.seek(rec.offset)
        buf = torch.frombuffer(bytearray(f.read(rec.nbytes)), dtype=torch.uint8)
    return tensor_views(buf, rec)


def check_hf_store(store: ExpertStore, ckpt_dir: str, configs: dict) -> None:
    """A store written from safetensors serves a checkpoint when it has the checkpoint's expert layout and holds its
    weights: the first and last expert of every MoE layer are compared with the checkpoint's expert files, value for
    value (a bf16 store against the fp32 checkpoint it was imported into: the cast is exact). A checkpoint trained
    after the import, or imported from other weights, fails this with one line (stale)."""
    sizes = list(moe_layer_sizes(configs))
    stale = (f"{os.path.join(store.directory, 'manifest.json')}: stale expert store, written from "
             f"{store.source.get('hf_dir')}, does not hold the experts of {ckpt_dir}")
    fix = "; rewrite it (tools/offload_experts.py --load) or use another --moe-expert-store"
    if store.source.get("num_experts") != sizes or store.source.get("hidden_size") != configs["model"]["hidden_size"]:
        raise OffloadError(f"{stale} (experts per layer {store.source.get('num_experts')} vs {sizes}){fix}")
    for m, n in enumerate(sizes):
        for e in sorted({0, n - 1}):
            path = checkpointing.expert_path(ckpt_dir, m, e)
            weights = checkpointing.load_checkpoint_file(ckpt_dir, path)["model"]
            rec = _read_record(store, (m, e))
            for name, src in RECORD_TENSORS:
                a, b = weights[src], rec[name]
                if a.shape != b.shape or not torch.equal(a.double(), b.double()):  # exact in either dtype
                    raise OffloadError(f"{stale} (MoE layer {m} expert {e} {src} differs){fix}")


class OffloadRuntime:
    """The cache, prefetcher and counters of one offloaded model; `summary()` is the reported statistics."""

    def __init__(self, cache: ExpertCache, prefetcher: Optional[GatePrefetcher], cfg: OffloadConfig,
                 budget_bytes: int):
        self.cache, self.prefetcher, self.cfg, self.budget_bytes = cache, prefetcher, cfg, budget_bytes
        self.tokens = 0
        self.started = time.perf_counter()

    def count_tokens(self, module, args) -> None:
        self.tokens += int(args[0].numel())

    def summary(self) -> dict:
        wall = time.perf_counter() - self.started
        s = self.cache.stats.summary()
        s.update(self.prefetcher.summary() if self.prefetcher is not None else
                 {"prefetch_recall": None, "prefetch_precision": None, "prefetch_guesses": 0})
        t = max(self.tokens, 1)
        s.update({
            "store": self.cache.store.directory, "budget_bytes": self.budget_bytes,
            "slots": self.cache.num_slots, "record_bytes": self.cache.record_bytes,
            "expert_bytes_total": self.cache.store.total_bytes(), "prefetch": self.cfg.prefetch,
            "device": str(self.cache.device), "tokens": self.tokens, "wall_seconds": wall,
            "bytes_read_per_token": s["bytes_read"] / t, "stall_seconds_per_token": s["stall_seconds"] / t,
            "stall_fraction": s["stall_seconds"] / wall if wall > 0 else None,
        })
        return s

    def close(self) -> None:
        self.cache.close()


def offloaded_builder(cfg: OffloadConfig):
    """The `build` of megatron.checkpointing.build_model_from_checkpoint for a model with offloaded experts."""
    def build(mcfg, moe_cfg, payload: dict, ckpt_dir: str, configs: dict, device: torch.device):
        _, iteration = checkpointing.resolve_checkpoint_dir(ckpt_dir)
        return build_offloaded_model(mcfg, moe_cfg, payload, ckpt_dir, iteration, configs, cfg, device)
    return build


def build_offloaded_model(mcfg, moe_cfg, payload: dict, ckpt_dir: str, iteration: int, configs: dict,
                          cfg: OffloadConfig, device: torch.device):
    """(GPTModel in eval mode with offloaded experts, OffloadRuntime). Dense weights come from `payload`."""
    from megatron.model import GPTModel

    if moe_cfg is None:
        raise OffloadError(f"--moe-offload {cfg.mode}: checkpoint {ckpt_dir} is dense (no experts to offload)")
    store = open_or_write_store(ckpt_dir, iteration, configs, cfg.directory)
    budget = parse_bytes(cfg.cache_bytes, "--moe-expert-cache-bytes", total=store.total_bytes())
    slots = budget // store.record_bytes
    cache = ExpertCache(store, budget, device=device, min_slots=moe_cfg.topk, num_readers=cfg.num_readers,
                        verify=cfg.verify, prefetch_slots=max(1, min(2 * moe_cfg.topk, slots // 2)))
    with torch.device("meta"):
        model = GPTModel(mcfg, moe_cfg, None)
    moe_blocks = []
    for idx, block in enumerate(model.layers):
        if isinstance(block.mlp, MoELayer):
            layer = block.mlp
            layer.experts = OffloadedExperts(cache, layer.layer_index, layer.num_experts, mcfg.hidden_size,
                                             layer.experts.w2_eDF.shape[-1], activation=layer.experts.activation)
            moe_blocks.append((idx, layer.layer_index))
    for mod in model.modules():  # buffers first: a module's _apply may carry a buffer over (the router's fp32
        for n, b in list(mod._buffers.items()):  # expert bias), which a meta tensor cannot be copied out of
            if b is not None and b.is_meta:
                mod._buffers[n] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    model.to_empty(device=device)
    for mod in model.modules():
        if hasattr(mod, "init_buffers"):
            mod.init_buffers()
    checkpointing.load_model_state(model, payload, ckpt_dir, load_experts=False)
    model.eval()
    prefetcher = None
    if cfg.prefetch == "gate":
        predictors = {m: (model.layers[idx].post_attention_layernorm, model.layers[idx].mlp.router.weight,
                          moe_cfg.topk) for idx, m in moe_blocks}
        prefetcher = GatePrefetcher(cache, predictors)
        moe_block_ids = {idx for idx, _ in moe_blocks}
        for idx, m in moe_blocks:
            if idx > 0:
                defer = (idx - 1) in moe_block_ids
                model.layers[idx - 1].after_attention = _at_inference(
                    lambda h, m=m, defer=defer: prefetcher.after_attention(m, h, defer))
            before = _at_inference(lambda h, m=m: prefetcher.before_block(m, h))
            model.layers[idx].register_forward_pre_hook(lambda mod, args, before=before: before(args[0]))
    runtime = OffloadRuntime(cache, prefetcher, cfg, budget)
    model.word_embeddings.register_forward_pre_hook(runtime.count_tokens)
    logger.info("experts offloaded to %s: %d records of %.1f MB, cache %d slots (%.1f MB, %.0f%% of %.1f MB), "
                "prefetch %s, on %s", cfg.directory, len(store.records), store.record_bytes / 1e6, cache.num_slots,
                cache.num_slots * store.record_bytes / 1e6, 100 * cache.num_slots * store.record_bytes /
                max(store.total_bytes(), 1), store.total_bytes() / 1e6, cfg.prefetch, device)
    return model, runtime


def _at_inference(fn):
    """fn(h), skipped while autograd records (prefetch guesses belong to inference only)."""
    def hook(h: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not h.requires_grad:
            fn(h)
    return hook


def offload_report(s: dict) -> str:
    """One summary line of an offloaded run's statistics."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return (f"offload: hit rate {pct(s['hit_rate'])}, prefetch recall {pct(s['prefetch_recall'])} precision "
            f"{pct(s['prefetch_precision'])}, {s['bytes_read'] / 1e6:.1f} MB read ({s['bytes_read_per_token'] / 1e6:.2f}"
            f" MB/token) at {s['read_GBps'] or 0:.2f} GB/s, stall {s['stall_seconds']:.2f} s "
            f"({pct(s['stall_fraction'])} of wall), {s['evictions']} evictions, peak resident "
            f"{s['peak_resident_bytes'] / 1e6:.1f} MB")


# ------------------------------------------------------------------------------------ the inference flags
def add_expert_offload_args(p: argparse.ArgumentParser) -> None:
    """NVMe expert offload at inference (tools/generate.py, tools/eval_zeroshot.py): moe.offload.OffloadConfig.
    The store's flag is --moe-expert-store, distinct from training's --moe-offload-dir (optimizer-state scratch);
    these CLIs never train, so they also accept --moe-offload-dir as its alias (the spelling earlier releases and
    the offload guide's commands used)."""
    g = p.add_argument_group("expert offload")
    g.add_argument("--moe-offload", choices=["none", "nvme"], default="none",
                   help="nvme: keep the experts in an expert store on disk and read them through a cache")
    g.add_argument("--moe-expert-store", "--moe-offload-dir", dest="moe_expert_store", default=None,
                   help="the expert store directory (tools/offload_experts.py; written from --load when missing or "
                        "empty)")
    g.add_argument("--moe-expert-cache-bytes", default="25%",
                   help="experts kept resident: a byte size (2GB, 512MiB) or a percentage of all expert bytes")
    g.add_argument("--moe-prefetch", choices=["gate", "none"], default="gate",
                   help="gate: the next MoE layer's router on the current hidden state picks experts to read ahead")
    g.add_argument("--moe-offload-readers", type=int, default=2, help="reader threads (one aio handle each)")
    g.add_argument("--moe-offload-activation-bytes", default="1GiB",
                   help="activation memory of one layer-major block of micro-batches (offline scoring)")
    g.add_argument("--no-moe-offload-layer-major", action="store_true",
                   help="score micro-batches one at a time instead of in layer-major blocks")
    g.add_argument("--stats-json", default=None, help="write the offload statistics (JSON) here")


def expert_offload_config_from_args(args) -> OffloadConfig:
    """The inference flags above -> OffloadConfig (its checks raised as ConfigError: they name the flag)."""
    try:
        return OffloadConfig(mode=args.moe_offload, directory=args.moe_expert_store,
                             cache_bytes=args.moe_expert_cache_bytes, prefetch=args.moe_prefetch,
                             num_readers=args.moe_offload_readers, activation_bytes=args.moe_offload_activation_bytes,
                             layer_major=not args.no_moe_offload_layer_major)
    except ValueError as e:  # moe/ raises ValueError (it cannot import megatron.errors)
        raise ConfigError(str(e)) from None
