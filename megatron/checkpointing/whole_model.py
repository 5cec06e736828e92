"""One process's whole model from a checkpoint of any TP/EP size: the one loader behind generation, evaluation, the
distillation teacher, the Hugging Face exporters and offloaded inference."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from megatron.checkpointing.load import load_model_state
from megatron.checkpointing.tp_shards import load_dense_whole, model_configs_from_checkpoint
from megatron.config import ModelConfig
from megatron.errors import CheckpointError
from megatron.model import GPTModel
from moe.config import MoEConfig

# (recorded configs, checkpoint directory) -> the configs to build the model with
ConfigsToModel = Callable[[dict, str], Tuple[ModelConfig, Optional[MoEConfig]]]
# (ModelConfig, MoEConfig, dense payload, directory, recorded configs, device) -> (model, runtime): another way to
# build and fill the model (megatron.offload.offloaded_builder: experts read through a cache)
Builder = Callable[[ModelConfig, Optional[MoEConfig], dict, str, dict, torch.device], Tuple[GPTModel, object]]


@dataclass
class LoadedModel:
    model: GPTModel  # every weight loaded, experts included (unless offloaded); eval mode
    configs: dict  # what the checkpoint recorded (model, moe, tokenizer, ...)
    ckpt_dir: str  # the iteration directory read
    runtime: Optional[object] = None  # megatron.offload.OffloadRuntime when the experts are offloaded


def build_model_from_checkpoint(load: str, device=None, *, flag: str = "--load",
                                configs_to_model: Optional[ConfigsToModel] = None,
                                moe_overrides: Optional[dict] = None, build: Optional[Builder] = None,
                                keep_rng: bool = False) -> LoadedModel:
    """Builds the architecture a checkpoint records (or `configs_to_model`'s version of it) and loads its weights.

    Args:
      load: a checkpoint root (tracker inside) or an iter_XXXXXXX directory, written at any TP size (the shards are
        merged in memory) and any EP size (expert files are per global expert).
      device: where the model lives (default CPU).
      flag: the flag `load` came from, named in every error (e.g. --load-teacher).
      configs_to_model: (recorded configs, directory) -> (ModelConfig, MoEConfig or None); default: the recorded
        ones for one process (EP size 1) with `moe_overrides` applied.
      build: builds and fills the model instead (offloaded experts: megatron.offload.offloaded_builder); the runtime it
        returns is `runtime`.
      keep_rng: build under a forked RNG, so the global generators are not consumed by the (overwritten) random
        init (a teacher built after --load restored the RNG keeps resume exact).
    Raises:
      CheckpointError (one line) for an unreadable or mismatching checkpoint.
    """
    try:
        payload, ckpt_dir = load_dense_whole(load)
    except CheckpointError as e:  # its messages name --load; say which flag the path came from
        msg = str(e)
        if flag == "--load":
            raise
        raise CheckpointError(f"{flag} " + msg[len("--load "):] if msg.startswith("--load ") else
                              f"{flag}: {msg}") from None
    configs = payload.get("configs") or {}
    if configs_to_model is None:
        mcfg, moe_cfg = model_configs_from_checkpoint(configs, ckpt_dir, moe_overrides)
    else:
        mcfg, moe_cfg = configs_to_model(configs, ckpt_dir)
    device = torch.device(device or "cpu")
    if build is not None:
        model, runtime = build(mcfg, moe_cfg, payload, ckpt_dir, configs, device)
        return LoadedModel(model, configs, ckpt_dir, runtime)
    with torch.random.fork_rng(devices=[]) if keep_rng else contextlib.nullcontext():
        model = GPTModel(mcfg, moe_cfg, None)
    try:
        load_model_state(model, payload, ckpt_dir)
    except CheckpointError as e:
        if flag == "--load":
            raise
        raise CheckpointError(f"{flag}: {e}") from None
    return LoadedModel(model.to(device).eval(), configs, ckpt_dir)
