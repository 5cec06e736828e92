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
from megatron.hf.weights import SafetensorsReader, export_tensors, import_experts, import_tensors, write_shards

__all__ = ["FAMILIES", "import_hf", "export_hf", "hf_architecture", "hf_vocab_size", "write_checkpoint"]
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


def write_checkpoint(save: str, model, configs: dict, experts=None) -> str:
    """The one place converted weights become a checkpoint (iteration 0), through the checkpointing package's
    writer. `experts`: None when the model holds its experts; else the model's routed experts are on the meta
    device and `experts` yields (MoE layer index, expert id, {expert-file name: tensor}) one expert at a time:
    the writer saves the model (meta experts) under a temporary root, each expert file is then rewritten from
    the iterator (the writer's expert-file layout), the checksums recomputed (write_manifest_of), and the
    directory and tracker moved into `save`, so an interrupted import leaves no checkpoint behind."""
    from megatron import checkpointing

    if checkpointing.read_tracker(save) is not None:
        raise CheckpointError(f"--save {save}: already holds a checkpoint; choose an empty directory")
    if experts is None:
        return checkpointing.save_checkpoint(save, 0, model, None, None, None, {}, configs)
    tmp_root = os.path.join(save, ".hf_import_tmp")
    shutil.rmtree(tmp_root, ignore_errors=True)
    try:
        ckpt = checkpointing.save_checkpoint(tmp_root, 0, model, None, None, None, {}, configs)
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


def _model_without_experts(cfg, moe):
    """GPTModel with every parameter on CPU (uninitialised) except the routed experts, which stay on the meta
    device (no memory): Parameter objects are replaced keeping their attributes (TP layout, expert tags)."""
    from megatron.model import GPTModel
    from moe.experts import is_expert_param

    with torch.device("meta"):
        model = GPTModel(cfg, moe, None)
    made = {}
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is None or is_expert_param(p):
                continue
            if id(p) not in made:  # a parameter shared by two modules stays shared
                new = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                made[id(p)] = new
            mod._parameters[n] = made[id(p)]
        for n, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:  # persistent ones are overwritten; the others are never used here
                mod._buffers[n] = torch.zeros(b.shape, dtype=b.dtype)
    return model


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
def _fill(model, tensors, hf_dir: str) -> None:
    """Copies (name, tensor) pairs into the model's non-meta parameters and buffers; every one must be given."""
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
               "training_flags": training_flags(cfg, recorded_moe, tokenizer["tokenizer_model"])}
    reader = SafetensorsReader(hf_dir)
    try:
        model = _model_without_experts(cfg, moe)  # the routed experts go from safetensors to their files
        _fill(model, import_tensors(reader, cfg, moe, arch, hf_cfg, experts=False), hf_dir)
        experts = import_experts(reader, cfg, moe, arch) if moe is not None else None
        out = write_checkpoint(save, model.eval(), configs, experts)
    finally:
        reader.close()
    with open(os.path.join(save, "hf_import_flags.txt"), "w") as f:  # beside the checkpoint, for --finetune
        f.write(shlex.join(configs["training_flags"]) + "\n")
    return out


def export_hf(load: str, out_dir: str, architecture: Optional[str] = None,
              max_shard_bytes: int = 5 * 2 ** 30, dtype: str = "float32") -> str:
    """Checkpoint -> `architecture` (default: the one it was imported from, else the one its blocks imply)."""
    from megatron import checkpointing
    from megatron.checkpointing import load_dense_whole, model_configs_from_checkpoint

    payload, ckpt_dir = load_dense_whole(load)  # the dense part (TP shards merged); experts are read one by one
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
    return out_dir
