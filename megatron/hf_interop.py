"""Hugging Face interop: GPT-2 (`GPT2LMHeadModel`) weights into and out of this project's checkpoint layout, and a
safetensors export (with a config this project reloads) for checkpoints GPT-2 cannot express, such as MoE.

GPT-2 and this model compute the same function once these details line up (each checked on import/export):
- Conv1D: GPT-2 stores its projections as [in, out] (y = x W + b); torch Linear is [out, in], so each is transposed.
- Fused QKV: GPT-2's c_attn output is [q | k | v], each split into heads as [heads, head_dim] -- the same layout as
  this model's query_key_value ([3, heads, head_dim]), so the transposed weight needs no reordering.
- Activation: GPT-2's "gelu_new" is GELU's tanh approximation, this model's dense MLP (megatron/model/mlp.py).
- LayerNorm eps (layer_norm_epsilon), learned absolute positions (n_positions), tied input/output embeddings,
  attention scale 1/sqrt(head_dim) (scale_attn_weights, not by layer index), biases on every projection.
- Vocabulary: kept at exactly GPT-2's size by default (make_vocab_size_divisible_by=1); padding it (needed for
  tensor parallelism) appends zero rows whose logit is 0, which changes the softmax unless they are ignored.
  Export writes every (padded) row, so the exported model's logits are this model's logits.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Dict, Optional, Tuple

import torch

from megatron import checkpointing
from megatron.checkpointing import model_configs_from_checkpoint
from megatron.config import ModelConfig
from megatron.errors import CheckpointError, ConfigError
from megatron.model import GPTModel

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # tanh approximation (gelu_fast: same formula)
MEGATRON_CONFIG = "megatron_config.json"  # beside model.safetensors in a safetensors export
# (ours, GPT-2's) per-layer names; the weights of the "conv" entries are transposed
_LAYER_MAP = (("input_layernorm.weight", "ln_1.weight", False), ("input_layernorm.bias", "ln_1.bias", False),
              ("self_attention.query_key_value.weight", "attn.c_attn.weight", True),
              ("self_attention.query_key_value.bias", "attn.c_attn.bias", False),
              ("self_attention.dense.weight", "attn.c_proj.weight", True),
              ("self_attention.dense.bias", "attn.c_proj.bias", False),
              ("post_attention_layernorm.weight", "ln_2.weight", False),
              ("post_attention_layernorm.bias", "ln_2.bias", False),
              ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", True), ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", False),
              ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", True),
              ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", False))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face conversion needs transformers: pip install -r requirements-test.txt "
                          "(or the project's [hf] extra)") from None
    return transformers


def model_config_from_gpt2(hf: dict, make_vocab_size_divisible_by: int = 1) -> ModelConfig:
    """ModelConfig for a GPT-2 config.json dict; ConfigError (one line) for a variant this model cannot compute."""
    from megatron.tokenizer import pad_vocab_size

    refusals = [
        (hf.get("model_type", "gpt2") == "gpt2", f"model_type {hf.get('model_type')!r} is not gpt2"),
        (hf.get("activation_function", "gelu_new") in TANH_GELUS,
         f"activation_function {hf.get('activation_function')!r}: this model's MLP is GELU's tanh approximation "
         f"(one of {', '.join(TANH_GELUS)})"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights=false (unscaled attention) is not supported"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is not supported"),
        (hf.get("tie_word_embeddings", True), "untied input/output embeddings are not supported"),
        (not hf.get("add_cross_attention", False), "cross-attention layers are not supported"),
    ]
    for ok, why in refusals:
        if not ok:
            raise ConfigError(f"GPT-2 config: {why}")
    h, n_pos = hf["n_embd"], hf["n_positions"]
    return ModelConfig(num_layers=hf["n_layer"], hidden_size=h, num_attention_heads=hf["n_head"],
                       ffn_hidden_size=hf.get("n_inner") or 4 * h, seq_length=n_pos, max_position_embeddings=n_pos,
                       padded_vocab_size=pad_vocab_size(hf["vocab_size"], make_vocab_size_divisible_by),
                       hidden_dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
                       init_method_std=hf.get("initializer_range", 0.02),
                       layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5))


def state_dict_from_gpt2(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """This model's state dict from a GPT2LMHeadModel's (names with or without the `transformer.` prefix)."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in hf_sd.items()}

    def get(name):
        if name not in sd:
            raise CheckpointError(f"GPT-2 weights: {name} is missing")
        return sd[name].detach().to(torch.float32)

    wte = get("wte.weight")
    emb = torch.zeros(cfg.padded_vocab_size, cfg.hidden_size)
    emb[:wte.shape[0]] = wte
    out = {"word_embeddings.weight": emb, "position_embeddings.weight": get("wpe.weight"),
           "final_layernorm.weight": get("ln_f.weight"), "final_layernorm.bias": get("ln_f.bias")}
    for i in range(cfg.num_layers):
        for ours, theirs, conv in _LAYER_MAP:
            t = get(f"h.{i}.{theirs}")
            out[f"layers.{i}.{ours}"] = t.t().contiguous() if conv else t.clone()
    return out


def gpt2_from_state_dict(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(GPT-2 config.json dict, GPT2LMHeadModel state dict) of a dense model's state dict."""
    hf_cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.padded_vocab_size,
              "n_positions": cfg.max_position_embeddings, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
              "n_head": cfg.num_attention_heads, "n_inner": cfg.ffn_hidden_size, "activation_function": "gelu_new",
              "layer_norm_epsilon": cfg.layernorm_epsilon, "resid_pdrop": cfg.hidden_dropout,
              "embd_pdrop": cfg.hidden_dropout, "attn_pdrop": cfg.attention_dropout,
              "initializer_range": cfg.init_method_std, "scale_attn_weights": True, "tie_word_embeddings": True,
              "bos_token_id": 50256, "eos_token_id": 50256}
    out = {"transformer.wte.weight": sd["word_embeddings.weight"], "transformer.wpe.weight": sd["position_embeddings.weight"],
           "transformer.ln_f.weight": sd["final_layernorm.weight"], "transformer.ln_f.bias": sd["final_layernorm.bias"]}
    for i in range(cfg.num_layers):
        for ours, theirs, conv in _LAYER_MAP:
            t = sd[f"layers.{i}.{ours}"].float()
            out[f"transformer.h.{i}.{theirs}"] = t.t().contiguous() if conv else t.clone()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return hf_cfg, out


def _save(root: str, model: GPTModel, configs: dict) -> str:
    if checkpointing.read_tracker(root) is not None:
        raise CheckpointError(f"--save {root}: already holds a checkpoint; choose an empty directory")
    return checkpointing.save_checkpoint(root, 0, model, None, None, None, {}, configs)


def import_gpt2(hf_dir: str, save: str, vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                make_vocab_size_divisible_by: int = 1) -> str:
    """GPT2LMHeadModel directory -> this project's checkpoint (iteration 0) under `save`; returns its directory."""
    tf = _transformers()
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"--hf-dir {hf_dir}: no config.json (not a Hugging Face model directory)")
    hf_cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg = model_config_from_gpt2(hf_cfg, make_vocab_size_divisible_by)
    hf_model = tf.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32)
    model = GPTModel(cfg)
    model.load_state_dict(state_dict_from_gpt2(hf_model.state_dict(), cfg))
    vocab_file = vocab_file or _existing(hf_dir, "vocab.json")
    merge_file = merge_file or _existing(hf_dir, "merges.txt")
    configs = {"model": dataclasses.asdict(cfg), "moe": None,
               "tokenizer": {"tokenizer_type": "GPT2BPETokenizer",
                             "vocab_file": os.path.abspath(vocab_file) if vocab_file else None,
                             "merge_file": os.path.abspath(merge_file) if merge_file else None,
                             "tokenizer_model": None, "make_vocab_size_divisible_by": make_vocab_size_divisible_by},
               "parallel": {"tensor_model_parallel_size": 1}, "converted_from": os.path.abspath(hf_dir)}
    return _save(save, model, configs)


def _existing(d: str, name: str) -> Optional[str]:
    p = os.path.join(d, name)
    return p if os.path.isfile(p) else None


def load_whole_model(load: str) -> Tuple[GPTModel, dict]:
    """(model on CPU in eval mode with every weight, experts included, recorded configs) of any checkpoint."""
    loaded = checkpointing.build_model_from_checkpoint(load)
    return loaded.model, loaded.configs


def export_gpt2(load: str, out_dir: str) -> str:
    """Dense checkpoint -> GPT2LMHeadModel directory (config.json, model.safetensors, tokenizer files if known)."""
    tf = _transformers()
    model, configs = load_whole_model(load)
    cfg = model.cfg
    if configs.get("moe"):
        raise ConfigError(f"--load {load} is a MoE checkpoint: GPT-2 has no experts; export it with "
                          f"--format safetensors")
    if cfg.position_embedding_type != "learned_absolute":
        raise ConfigError(f"--load {load} uses {cfg.position_embedding_type} positions: GPT-2 has learned absolute "
                          f"positions; export it with --format safetensors")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    other = [f for f in ("normalization", "num_query_groups", "kv_channels", "qk_layernorm", "add_bias_linear",
                         "untie_embeddings_and_output_weights", "multi_latent_attention") if getattr(cfg, f) != defaults[f]]
    other += ["activation"] if cfg.activation == "swiglu" else []
    if other:  # issue 25's blocks: GPT-2 has LayerNorm, GELU, MHA with biases and a tied head
        raise ConfigError(f"--load {load} has a block GPT-2 does not ({', '.join(other)}); export it with "
                          f"--format safetensors")
    hf_cfg, hf_sd = gpt2_from_state_dict(model.state_dict(), cfg)
    hf_model = tf.GPT2LMHeadModel(tf.GPT2Config(**{k: v for k, v in hf_cfg.items() if k != "model_type"}))
    missing, unexpected = hf_model.load_state_dict(hf_sd, strict=False)
    if [k for k in missing if not k.endswith("attn.bias")] or unexpected:  # attn.bias: GPT-2's causal-mask buffer
        raise CheckpointError(f"GPT-2 export: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    tok = configs.get("tokenizer") or {}
    if tok.get("tokenizer_type") == "GPT2BPETokenizer":
        for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt")):
            if tok.get(key) and os.path.isfile(tok[key]):
                shutil.copyfile(tok[key], os.path.join(out_dir, name))
    return out_dir


def export_safetensors(load: str, out_dir: str) -> str:
    """Any checkpoint (dense or MoE, any TP size) -> model.safetensors (this model's parameter names, experts
    included) + megatron_config.json (the recorded configs); `import_safetensors` turns it back into a checkpoint."""
    from safetensors.torch import save_file

    model, configs = load_whole_model(load)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt", "producer": "megatron-moe"})
    keep = {k: configs[k] for k in ("model", "moe", "tokenizer") if k in configs}
    with open(os.path.join(out_dir, MEGATRON_CONFIG), "w") as f:
        json.dump(keep, f, indent=2)
    return out_dir


def import_safetensors(src_dir: str, save: str) -> str:
    """A `export_safetensors` directory -> this project's checkpoint (iteration 0) under `save`."""
    from safetensors.torch import load_file

    configs = json.load(open(os.path.join(src_dir, MEGATRON_CONFIG)))
    mcfg, moe_cfg = model_configs_from_checkpoint(configs, src_dir)
    model = GPTModel(mcfg, moe_cfg, None)
    sd = load_file(os.path.join(src_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{src_dir}: model.safetensors does not match {MEGATRON_CONFIG} (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    return _save(save, model, dict(configs, parallel={"tensor_model_parallel_size": 1}))


def import_any(src_dir: str, save: str, **gpt2_options) -> str:
    """A safetensors export of this project (megatron_config.json present) or a GPT2LMHeadModel directory."""
    if os.path.isfile(os.path.join(src_dir, MEGATRON_CONFIG)):
        return import_safetensors(src_dir, save)
    return import_gpt2(src_dir, save, **gpt2_options)
