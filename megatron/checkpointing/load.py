"""Loading a training checkpoint: the dense file of this TP rank, the expert files of this rank's experts, the
architecture checked against the flags, then the model, optimizer, scheduler, loss scaler and RNG streams."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from megatron.checkpointing import experts as expert_files
from megatron.checkpointing import optim_state
from megatron.checkpointing.experts import is_expert_param_name
from megatron.checkpointing.layout import log
from megatron.checkpointing.read import read_training_checkpoint
from megatron.checkpointing.rng import restore_rng
from megatron.errors import CheckpointError




# Fields of ModelConfig/MoEConfig that must match between a checkpoint and the running flags.
_FLAG_OF_FIELD = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "ffn_hidden_size": "--ffn-hidden-size", "padded_vocab_size": "vocabulary size (--vocab-file/--tokenizer-model)",
    "max_position_embeddings": "--max-position-embeddings", "position_embedding_type": "--position-embedding-type",
    "num_experts": "--num-experts", "expert_interval": "--expert-interval", "mlp_type": "--mlp-type",
    # Megatron-LM core blocks and experts (issue 25)
    "normalization": "--normalization", "activation": "--swiglu (or the GELU flags)",
    "num_query_groups": "--num-query-groups", "kv_channels": "--kv-channels", "qk_layernorm": "--qk-layernorm",
    "rotary_percent": "--rotary-percent", "add_bias_linear": "--disable-bias-linear",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "multi_latent_attention": "--multi-latent-attention", "q_lora_rank": "--q-lora-rank",
    "kv_lora_rank": "--kv-lora-rank", "qk_head_dim": "--qk-head-dim", "qk_pos_emb_head_dim": "--qk-pos-emb-head-dim",
    "v_head_dim": "--v-head-dim", "layer_freq": "--moe-layer-freq", "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "shared_expert_ffn_hidden_size": "--moe-shared-expert-intermediate-size",
    "shared_expert_gate": "--moe-shared-expert-gate",
    "add_qkv_bias": "--add-qkv-bias", "qk_layernorm_full": "--qk-layernorm-full",
}


def check_config_match(saved: dict, running: dict, what: str, ckpt: str) -> None:
    for field, flag in _FLAG_OF_FIELD.items():
        if field in saved and field in running and _norm(saved[field]) != _norm(running[field]):
            raise CheckpointError(f"{flag} mismatch: checkpoint {ckpt} has {field}={_norm(saved[field])}, "
                                  f"the {what} flags give {_norm(running[field])}")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _renamed_legacy_keys(sd: dict) -> dict:
    """Checkpoints written before issue 14 name the Residual-MoE branch's linears fc1/fc2; the one MLP class
    (moe.experts.MLP) names them as the dense MLP does."""
    legacy = {".residual.mlp.fc1.": ".residual.mlp.dense_h_to_4h.", ".residual.mlp.fc2.": ".residual.mlp.dense_4h_to_h."}
    out = {}
    for k, v in sd.items():
        for old, new in legacy.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def load_model_state(model, payload: dict, ckpt_dir: str, strict: bool = True, load_experts: bool = True,
                     experts: Optional[dict] = None) -> None:
    """Loads dense weights, then (unless `load_experts` is False: experts offloaded to an expert store) each local
    expert's slice from its per-expert file (or from `experts`, read_expert_files' result, when given)."""
    is_expert = is_expert_param_name(model)
    own = model.state_dict()
    dense_sd = _renamed_legacy_keys(payload["model"])
    for k, v in dense_sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{ckpt_dir}: parameter {k} has shape {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(own[k].shape)} in the model built from the flags")
    missing = [k for k in own if k not in dense_sd and not is_expert.get(k, False)]
    unexpected = [k for k in dense_sd if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{ckpt_dir}: state does not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); check the architecture flags")
    model.load_state_dict(dense_sd, strict=False)
    if load_experts:
        expert_files.load_experts(model, ckpt_dir, load_weights=True, experts=experts)



def load_optimizer_state(model, optimizer, payload: dict, ckpt_dir: str, experts: Optional[dict] = None) -> None:
    state = dict(payload.get("optimizer") or {})
    if optim_state.expert_state_offloaded(optimizer):
        expert_files.fill_offloaded_expert_state(model, optimizer, ckpt_dir, experts)
    else:
        state.update(expert_files.load_experts(model, ckpt_dir, load_weights=False, experts=experts))
    by_param = {p: {k: (v.to(p.device) if torch.is_tensor(v) else v) for k, v in state[name].items()}
                for name, p in model.named_parameters() if name in state}
    optim_state.load_state(optimizer, by_param, ckpt_dir)  # ZeRO: each rank keeps the slice it owns



def configs_for_checkpoint(cfg) -> dict:
    """What a checkpoint records of a TrainConfig: the architecture, tokenizer and batch settings."""
    return {"model": dataclasses.asdict(cfg.model),
            "moe": dataclasses.asdict(cfg.moe) if cfg.moe is not None else None,
            "tokenizer": {k: (os.path.abspath(v) if k in ("vocab_file", "merge_file", "tokenizer_model") and v
                              else v) for k, v in dataclasses.asdict(cfg.tokenizer).items()},
            "parallel": {"tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
                         "pipeline_model_parallel_size": cfg.parallel.pipeline_model_parallel_size},
            "data": {"seq_length": cfg.data.seq_length, "global_batch_size": cfg.data.global_batch_size,
                     "micro_batch_size": cfg.data.micro_batch_size, "seed": cfg.data.seed}}



def load_training_checkpoint(cfg, model, optimizer, scheduler, loss_scaler, groups) -> Optional[dict]:
    """Loads cfg.checkpoint.load (a TrainConfig's) into the model and, unless the flags say otherwise, the optimizer,
    LR scheduler, loss scaler and RNG streams; returns the restored counters {iteration, consumed_samples,
    consumed_tokens}, or None when they restart from zero (--finetune, --reset-iteration). The checkpoint's
    architecture must match the flags (CheckpointError naming the field)."""
    ck = cfg.checkpoint

    def check(payload: dict, ckpt_dir: str) -> None:  # the architecture, before any expert file is read
        saved = payload.get("configs", {})
        check_config_match(saved.get("model", {}), dataclasses.asdict(cfg.model), "training", ckpt_dir)
        if saved.get("moe") or cfg.moe:
            check_config_match(saved.get("moe") or {"num_experts": [1]},
                               dataclasses.asdict(cfg.moe) if cfg.moe else {"num_experts": [1]}, "training", ckpt_dir)

    # offloaded expert Adam state is not held for all experts at once: read_training_checkpoint verifies every file
    # and keeps the expert weights; _fill_offloaded_expert_state re-reads the state one file at a time
    offloaded = optim_state.expert_state_offloaded(optimizer)
    ckpt_dir, payload, experts = read_training_checkpoint(ck, model, groups, check, keep_optimizer=not offloaded)
    saved = payload.get("configs", {})
    if saved.get("moe") and cfg.moe and "drop_policy" not in saved["moe"]:
        log.warning("%s was trained before the routing choices were recorded (exact-GELU experts, probability "
                       "drop priority, gates renormalised before dropping, RTS in training only: "
                       "moe.config.LEGACY_ROUTING); training resumes with the flags' routing (DeepSpeed's) and "
                       "activation", ckpt_dir)
    load_model_state(model, payload, ckpt_dir, experts=experts)
    if ck.finetune:
        return None
    if ck.reset_iteration:  # a student starting a fresh schedule from these weights (and optimizer)
        if not ck.no_load_optim:
            load_optimizer_state(model, optimizer, payload, ckpt_dir, experts)
        if not ck.no_load_rng and payload.get("rng"):
            restore_rng(payload["rng"], model)  # the tensor-parallel dropout stream too (it was left out before)
        return None
    if not ck.no_load_optim:
        load_optimizer_state(model, optimizer, payload, ckpt_dir, experts)
        if payload.get("scheduler"):
            scheduler.load_state_dict(payload["scheduler"])
        if loss_scaler is not None and payload.get("loss_scaler"):
            loss_scaler.load_state_dict(payload["loss_scaler"])
    if not ck.no_load_rng and payload.get("rng"):
        restore_rng(payload["rng"], model)
    return {"iteration": int(payload["iteration"]),
            "consumed_samples": int(payload["counters"]["consumed_samples"]),
            "consumed_tokens": int(payload["counters"]["consumed_tokens"])}

