"""Megatron-layout checkpoints: atomic save (synchronous, or written on a background thread with --async-save) and
verified load of dense state per TP rank and one file per (MoE layer, expert); see DESIGN.md §5 and docs/design.md.

Modules: layout (names, tracker), integrity (hashed atomic writes, checksums.json, verified reads), rng, experts,
optim_state (the optimizer's side), payload (what a rank writes; CPU snapshots), save (prepare / write / commit),
manager (maybe_save, async), read (what --load names, --load-fallback), load (into model and optimizer), tp_shards
(TP merge/split), whole_model (build_model_from_checkpoint), faults (tools/fault_inject.py).
"""
from megatron.checkpointing.experts import (expert_param_names, is_expert_param_name, moe_layers,
                                            read_expert_files, read_whole_expert)
from megatron.checkpointing.faults import FAULT_ENV
from megatron.checkpointing.integrity import (checkpoint_complete, load_checkpoint_file, read_manifest,
                                              write_manifest_of)
from megatron.checkpointing.layout import (DENSE_FILE, ITER_DIR_RE, MANIFEST, TRACKER, CorruptCheckpointError,
                                           dense_path, expert_path, iter_dir, iteration_dirs, iteration_of,
                                           nothing_to_load, num_tp_shards, read_tracker, read_tracker_or_none,
                                           resolve_checkpoint_dir, write_tracker)
from megatron.checkpointing.load import (check_config_match, configs_for_checkpoint, load_model_state,
                                         load_optimizer_state, load_training_checkpoint)
from megatron.checkpointing.manager import CheckpointManager, Stateful
from megatron.checkpointing.read import load_candidates, load_dense, read_training_checkpoint
from megatron.checkpointing.rng import get_rng_state, restore_rng, set_rng_state
from megatron.checkpointing.save import save_checkpoint
from megatron.checkpointing.tp_shards import load_dense_whole, merge_shards, model_configs_from_checkpoint, \
    partition_layout, shard
from megatron.checkpointing.whole_model import LoadedModel, build_model_from_checkpoint
from megatron.errors import CheckpointError

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "CheckpointManager", "Stateful", "LoadedModel",
    "DENSE_FILE", "FAULT_ENV", "ITER_DIR_RE", "MANIFEST", "TRACKER",
    "build_model_from_checkpoint", "check_config_match", "checkpoint_complete", "configs_for_checkpoint",
    "dense_path", "expert_param_names", "expert_path", "get_rng_state", "is_expert_param_name", "iter_dir",
    "iteration_dirs", "iteration_of", "load_candidates", "load_checkpoint_file", "load_dense", "load_dense_whole",
    "load_model_state", "load_optimizer_state", "load_training_checkpoint", "merge_shards",
    "model_configs_from_checkpoint", "moe_layers", "nothing_to_load", "num_tp_shards", "partition_layout",
    "read_expert_files", "read_whole_expert", "read_manifest", "read_training_checkpoint", "read_tracker", "read_tracker_or_none",
    "resolve_checkpoint_dir", "restore_rng", "save_checkpoint", "set_rng_state", "shard", "write_manifest_of",
    "write_tracker",
]
