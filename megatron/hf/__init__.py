"""Hugging Face Llama-style families in and out of this project's checkpoints (issue 26; GPT-2: hf_interop.py).

    import_hf(hf_dir, save)   config.json (read with transformers' config classes) + safetensors shards, one
                              tensor at a time, -> a checkpoint at iteration 0 (configs record the HF config and,
                              when the directory has tokenizer.json, --tokenizer-type HuggingFaceTokenizer)
    export_hf(load, out_dir)  checkpoint -> config.json + model.safetensors shards AutoModelForCausalLM loads

Families: megatron/hf/configs.py (FAMILIES); names and layouts: megatron/hf/weights.py.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from typing import Optional

import torch

from megatron.errors import CheckpointError, ConfigError
from megatron.hf.configs import FAMILIES, from_hf, infer_architecture, recorded, to_hf, training_flags
from megatron.hf.weights import (SafetensorsReader, StoredDtype, export_tensors, import_experts, import_tensors,
                                 write_shards)

__all__ = ["FAMILIES", "import_hf", "export_hf", "hf_architecture", "hf_vocab_size", "write_checkpoint",
           "checkpoint_training_flags"]
FLAGS_FILE = "hf_import_flags.txt"
CHECKSUMS_FILE = "SHA256SUMS"  # written by export_hf beside the shards
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hf_architecture(hf_dir: str) -> str:
    """architectures[0] of HF_DIR/config.json (one-line errors for a missing or unreadable file)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"--hf-dir {hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.load(open(path))
    except ValueError as e:
        raise CheckpointError(f"--hf-dir {hf_dir}: config.json is not JSON ({e})") from None
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") == "gpt2":
        return "GPT2LMHeadModel"
    if len(archs) != 1:
        raise ConfigError(f"--hf-dir {hf_dir}: config.json architectures {archs} must name one architecture")
    return archs[0]


def _hf_config(hf_dir: str):
    from megatron.hf_interop import _transformers

    return _transformers().AutoConfig.from_pretrained(hf_dir)


class FileBackedParams:
    """Where an import puts the non-expert parameters: one shared mapping of a scratch file (`path`). A tensor filled
    from safetensors goes to the page cache and its pages leave this process at once (`drop`: madvise DONTNEED; a
    shared file mapping keeps the data in the page cache), and the checkpoint writer reads them back one record at
    a time, dropped after every chunk it writes, so the dense part (embeddings, attention, norms, routers, dense
    MLPs, shared experts) is never resident whole: the import's peak is about one tensor plus the safetensors
    reader's window."""

    def __init__(self, path: str, tensors):
        import mmap

        page = mmap.PAGESIZE
        self.offsets, total = [], 0
        for shape, dtype in tensors:
            self.offsets.append(total)
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            total += -(-nbytes // page) * page  # page-aligned, so dropping one tensor's pages spares the next
        self.path = path
        self._f = open(path, "w+b")
        self._f.truncate(max(total, page))
        self.mm = mmap.mmap(self._f.fileno(), max(total, page))

    def tensor(self, i: int, shape, dtype) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.mm, dtype=dtype, count=n, offset=self.offsets[i]).view(shape)

    def drop(self) -> None:
        import mmap

        self.mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._f.close()  # the mapping goes with the last tensor viewing it
        if os.path.exists(self.path):
            os.remove(self.path)


def write_checkpoint(save: str, model, configs: dict, experts=None, backing: Optional[FileBackedParams] = None
                     ) -> str:
    """The one place converted weights become a checkpoint (iteration 0), through the checkpointing package's
    writer. `experts`: None when the model holds its experts; else the model's routed experts are on the meta
    device and `experts` yields (MoE layer index, expert id, {expert-file name: tensor}) one expert at a time:
    the writer saves the model (meta experts) under a temporary root, each expert file is then rewritten from
    the iterator (the writer's expert-file layout), the checksums recomputed (write_manifest_of), and the
    directory and tracker moved into `save`, so an interrupted import leaves no checkpoint behind. `backing`: the
    FileBackedParams holding the model's dense tensors, whose pages are dropped after every chunk written."""
    from megatron import checkpointing

    if checkpointing.read_tracker(save) is not None:
        raise CheckpointError(f"--save {save}: already holds a checkpoint; choose an empty directory")
    from megatron.checkpointing import save as writer

    def save_model(root: str) -> str:  # save_checkpoint's three phases, with the pages dropped as it writes
        pending = writer.prepare(root, 0, model, None, {"scheduler": None, "loss_scaler": None, "counters": {}},
                                 configs)
        return writer.commit(writer.write(pending, after_write=backing.drop if backing is not None else None))

    if experts is None:
        return save_model(save)
    tmp_root = os.path.join(save, ".hf_import_tmp")
    shutil.rmtree(tmp_root, ignore_errors=True)
    try:
        ckpt = save_model(tmp_root)
        for moe_idx, gid, weights in experts:
            path = checkpointing.expert_path(ckpt, moe_idx, gid)
            if not os.path.isfile(path):
                raise CheckpointError(f"--save {save}: the writer wrote no {os.path.basename(path)}")
            num = torch.load(path, map_location="meta", weights_only=True)["num_experts"]
            torch.save({"moe_layer": moe_idx, "expert_id": gid, "num_experts": num, "model": weights,
                        "optimizer": {}}, path)
        checkpointing.write_manifest_of(ckpt, 0)
        final = checkpointing.iter_dir(save, 0)
        os.replace(ckpt, final)
        checkpointing.write_tracker(save, 0)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def _model_without_experts(cfg, moe, backing_path: Optional[str] = None):
    """(GPTModel with every parameter on CPU (uninitialised) except the routed experts, which stay on the meta
    device (no memory), the FileBackedParams holding them or None): Parameter objects are replaced keeping their
    attributes (TP layout, expert tags); with `backing_path` the CPU parameters live in a FileBackedParams there."""
    from megatron.model import GPTModel
    from moe.experts import is_expert_param

    with torch.device("meta"):
        model = GPTModel(cfg, moe, None)
    dense = {id(p): p for p in model.parameters() if not is_expert_param(p)}  # each shared parameter once
    index = {k: i for i, k in enumerate(dense)}
    backing = FileBackedParams(backing_path, [(p.shape, p.dtype) for p in dense.values()]) if backing_path else None
    made = {}
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is None or is_expert_param(p):
                continue
            if id(p) not in made:  # a parameter shared by two modules stays shared
                data = backing.tensor(index[id(p)], p.shape, p.dtype) if backing else torch.empty(p.shape,
                                                                                                  dtype=p.dtype)
                new = torch.nn.Parameter(data, requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                made[id(p)] = new
            mod._parameters[n] = made[id(p)]
        for n, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:  # persistent ones are overwritten; the others are never used here
                mod._buffers[n] = torch.zeros(b.shape, dtype=b.dtype)
    return model, backing


def hf_vocab_size(hf_dir: str) -> int:
    return int(json.load(open(os.path.join(hf_dir, "config.json")))["vocab_size"])


def check_parallel(cfg, moe, target_tp: int, target_ep: int):
    """One-line refusals for a --target-tp/--target-ep the model cannot be split by; the MoEConfig to record."""
    import dataclasses

    if target_tp < 1 or target_ep < 1:
        raise ConfigError(f"--target-tp ({target_tp}) and --target-ep ({target_ep}) must be >= 1")
    sizes = [("num_attention_heads", cfg.num_attention_heads), ("ffn_hidden_size", cfg.ffn_hidden_size)]
    if not cfg.multi_latent_attention:
        sizes.append(("num_key_value_heads", cfg.query_groups))
    if moe is not None and moe.shared_expert_ffn_hidden_size:
        sizes.append(("shared expert width", moe.shared_expert_ffn_hidden_size))
    for what, n in sizes:
        if n % target_tp:
            raise ConfigError(f"--target-tp {target_tp}: {what} ({n}) is not divisible by it")
    if target_tp > 1 and cfg.qk_layernorm_full:
        raise ConfigError(f"--target-tp {target_tp}: OLMoE's whole-projection q/k norms need TP 1")
    if target_ep == 1:
        return moe
    if moe is None:
        raise ConfigError(f"--target-ep {target_ep}: a dense model has no experts to split")
    if any(n % target_ep for n in moe.num_experts):
        raise ConfigError(f"--target-ep {target_ep}: the expert count ({moe.num_experts[0]}) is not divisible by it")
    return dataclasses.replace(moe, ep_size=target_ep)


@torch.no_grad()
def _fill(model, tensors, hf_dir: str, after_each=None) -> None:
    """Copies (name, tensor) pairs into the model's non-meta parameters and buffers; every one must be given.
    `after_each()` runs after each copy (FileBackedParams.drop)."""
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if not v.is_meta}
    done = set()
    for name, t in tensors:
        name, _, row = name.partition("#")
        dst = targets.get(name)
        dst = dst[int(row)] if dst is not None and row else dst
        if dst is None or dst.shape != t.shape:
            raise CheckpointError(f"--hf-dir {hf_dir}: {name} {tuple(t.shape)} does not fit this model "
                                  f"({tuple(dst.shape) if dst is not None else 'no such tensor'})")
        dst.copy_(t)
        done.add(name)
        if after_each is not None:
            after_each()
    missing = sorted(set(targets) - done)
    if missing:
        raise CheckpointError(f"--hf-dir {hf_dir}: no weights for {missing[:3]} ({len(missing)} tensors)")


def import_hf(hf_dir: str, save: str, make_vocab_size_divisible_by: int = 1,
              tokenizer_model: Optional[str] = None, target_ep: int = 1, target_tp: int = 1) -> str:
    """A directory of one of FAMILIES -> a checkpoint (TP 1; experts one file each, so any EP size loads it) under
    `save`, recording `target_ep` as the MoE config's EP size; returns its directory. `target_tp` is only checked
    here (tools/convert_hf.py splits the written checkpoint)."""
    from megatron.tokenizer import pad_vocab_size

    arch = hf_architecture(hf_dir)
    if arch not in FAMILIES:
        raise ConfigError(f"--hf-dir {hf_dir}: architecture {arch!r} is not supported; supported: GPT2LMHeadModel, "
                          f"{', '.join(FAMILIES)}")
    hf_cfg = _hf_config(hf_dir)
    if getattr(hf_cfg, "quantization_config", None):
        raise ConfigError(f"--hf-dir {hf_dir}: quantization_config ({hf_cfg.quantization_config.get('quant_method')}"
                          f" weights) is not supported; dequantize to bf16/fp32 first")
    cfg, moe = from_hf(hf_cfg, arch)
    recorded_moe = check_parallel(cfg, moe, target_tp, target_ep)
    if make_vocab_size_divisible_by != 1:
        import dataclasses
        cfg = dataclasses.replace(cfg, padded_vocab_size=pad_vocab_size(cfg.padded_vocab_size,
                                                                         make_vocab_size_divisible_by))
    tok_dir = tokenizer_model or (hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None)
    tokenizer = {"tokenizer_type": "HuggingFaceTokenizer" if tok_dir else None, "vocab_file": None,
                 "merge_file": None, "tokenizer_model": os.path.abspath(tok_dir) if tok_dir else None,
                 "make_vocab_size_divisible_by": make_vocab_size_divisible_by}
    raw = json.load(open(os.path.join(hf_dir, "config.json")))
    configs = {**recorded(cfg, recorded_moe), "tokenizer": tokenizer, "parallel": {"tensor_model_parallel_size": 1},
               "converted_from": os.path.abspath(hf_dir), "hf_config": raw,
               "training_flags": training_flags(cfg, recorded_moe, tokenizer["tokenizer_model"]) +
               (["--tensor-model-parallel-size", str(target_tp)] if target_tp > 1 else [])}
    reader = SafetensorsReader(hf_dir)
    os.makedirs(save, exist_ok=True)
    backing = None
    try:  # the routed experts go from safetensors to their files; the rest through a file-backed mapping
        model, backing = _model_without_experts(cfg, moe, os.path.join(save, ".hf_import_dense.tmp"))
        _fill(model, import_tensors(StoredDtype(reader), cfg, moe, arch, hf_cfg, experts=False), hf_dir, backing.drop)
        experts = import_experts(reader, cfg, moe, arch) if moe is not None else None
        out = write_checkpoint(save, model.eval(), configs, experts, backing)
    finally:
        reader.close()
        if backing is not None:
            backing.close()
    with open(os.path.join(save, FLAGS_FILE), "w") as f:  # beside the checkpoint, for --finetune
        f.write(shlex.join(configs["training_flags"]) + "\n")
    return out


class MappedStateDict:
    """The `model` state dict of a dense checkpoint file loaded with torch.load(mmap=True), re-mapped after every
    `remap_bytes` handed out: the pages a mapping has touched count in the process's RSS until the mapping goes, and
    it goes with the last tensor viewing it (export copies each tensor into its output shard)."""

    def __init__(self, path: str, sd: dict, remap_bytes: int = 256 * 2 ** 20):
        self.path, self._sd, self.remap_bytes, self._read = path, sd, remap_bytes, 0

    def __contains__(self, name: str) -> bool:
        return name in self._sd

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._read >= self.remap_bytes:  # the file was verified when first loaded; nobody rewrites it in place
            self._sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)["model"]
            self._read = 0
        t = self._sd[name]
        self._read += t.numel() * t.element_size()
        return t

    def keys(self):
        return self._sd.keys()


def checkpoint_training_flags(load: str) -> list:
    """pretrain_gpt.py flags that rebuild the model of the --load checkpoint (--use-checkpoint-args): the ones an
    import recorded (configs["training_flags"]), else, for a checkpoint trained here whose blocks a Hugging Face
    family computes (e.g. continued from an import), the same flags made from its recorded configs. One-line
    ConfigError for a checkpoint with neither."""
    from megatron import checkpointing
    from megatron.checkpointing import model_configs_from_checkpoint

    ckpt_dir, _ = checkpointing.resolve_checkpoint_dir(load)
    n = max(1, checkpointing.num_tp_shards(ckpt_dir))
    # mmap: only the recorded configs are read, not the weights
    payload = torch.load(checkpointing.dense_path(ckpt_dir, 0), map_location="cpu", mmap=True, weights_only=False)
    configs = payload.get("configs") or {}
    if configs.get("training_flags"):
        return list(configs["training_flags"])
    cfg, moe = model_configs_from_checkpoint(configs, ckpt_dir)
    try:
        to_hf(cfg, moe, infer_architecture(cfg, moe))
    except ConfigError as e:
        raise ConfigError(f"--use-checkpoint-args: {ckpt_dir} records no training flags and its model is not a "
                          f"Hugging Face family's ({e}); give the architecture flags instead") from None
    if moe is not None and configs["moe"].get("ep_size"):
        import dataclasses
        moe = dataclasses.replace(moe, ep_size=tuple(configs["moe"]["ep_size"]))
    seq = (configs.get("data") or {}).get("seq_length")
    flags = training_flags(cfg, moe, None, seq_length=seq)
    tok = configs.get("tokenizer") or {}  # the recorded tokenizer, whichever it is (later flags win)
    for flag, key in (("--tokenizer-type", "tokenizer_type"), ("--vocab-file", "vocab_file"),
                      ("--merge-file", "merge_file"), ("--tokenizer-model", "tokenizer_model"),
                      ("--make-vocab-size-divisible-by", "make_vocab_size_divisible_by")):
        flags += [flag, str(tok[key])] if tok.get(key) is not None else []
    return flags + (["--tensor-model-parallel-size", str(n)] if n > 1 else [])


def export_hf(load: str, out_dir: str, architecture: Optional[str] = None,
              max_shard_bytes: int = 5 * 2 ** 30, dtype: str = "float32") -> str:
    """Checkpoint -> `architecture` (default: the one it was imported from, else the one its blocks imply)."""
    from megatron import checkpointing
    from megatron.checkpointing import load_dense_whole, model_configs_from_checkpoint

    ckpt_dir, _ = checkpointing.resolve_checkpoint_dir(load)
    if checkpointing.num_tp_shards(ckpt_dir) <= 1:  # the dense file read a window at a time (MappedStateDict)
        path = checkpointing.dense_path(ckpt_dir, 0)
        payload = checkpointing.load_checkpoint_file(ckpt_dir, path, mmap=True)  # verified, then mapped
        payload["model"] = MappedStateDict(path, payload["model"])
    else:
        payload, ckpt_dir = load_dense_whole(load)  # TP shards merged in memory; experts are read one by one
    configs = payload.get("configs") or {}
    cfg, moe = model_configs_from_checkpoint(configs, ckpt_dir)

    def expert(layer: int, moe_index: int, e: int):
        return checkpointing.read_whole_expert(ckpt_dir, moe_index, e)["model"]  # ETP shards merged

    base = configs.get("hf_config") or {}
    arch = architecture or (base.get("architectures") or [None])[0] or infer_architecture(cfg, moe)
    hf_json = to_hf(cfg, moe, arch, base)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    hf_json["dtype"] = dtype
    os.makedirs(out_dir, exist_ok=True)
    write_shards(export_tensors(payload["model"], cfg, moe, arch, expert), out_dir, max_shard_bytes, torch_dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_json, f, indent=2)
    tok = configs.get("tokenizer") or {}
    if tok.get("tokenizer_type") == "HuggingFaceTokenizer" and tok.get("tokenizer_model"):
        for name in TOKENIZER_FILES:
            src = os.path.join(tok["tokenizer_model"], name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    write_sha256sums(out_dir)
    return out_dir


def write_sha256sums(out_dir: str) -> str:
    """OUT_DIR/SHA256SUMS over every other file there, in `sha256sum` format (`cd OUT_DIR && sha256sum -c
    SHA256SUMS` verifies it without this project; SHA-256 is also the Hub's LFS object id of each shard). Files
    are read in 64 MB chunks."""
    import hashlib

    lines = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name == CHECKSUMS_FILE or not os.path.isfile(path):
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(64 * 2 ** 20), b""):
                h.update(chunk)
        lines.append(f"{h.hexdigest()}  {name}\n")
    out = os.path.join(out_dir, CHECKSUMS_FILE)
    with open(out + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(out + ".tmp", out)
    return out
