"""Builds the frozen MoS/KD teacher from --load-teacher and the teacher architecture flags (DESIGN.md §4)."""
from __future__ import annotations

from typing import Optional

import torch

from megatron.checkpointing import build_model_from_checkpoint
from megatron.errors import CheckpointError
from megatron.config import ModelConfig
from moe.config import MoEConfig
from moe.distill import DistillConfig, TeacherRunner

# Teacher flag -> (DistillConfig field, recorded ModelConfig field)
_TEACHER_FLAGS = (
    ("--num-layers-teacher", "num_layers_teacher", "num_layers"),
    ("--hidden-size-teacher", "hidden_size_teacher", "hidden_size"),
    ("--num-attention-heads-teacher", "num_attention_heads_teacher", "num_attention_heads"),
)


def load_teacher(cfg: DistillConfig, padded_vocab_size: int, device=None,
                 seq_length: Optional[int] = None, vocab_size: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> TeacherRunner:
    """Builds the teacher GPTModel, loads --load-teacher into it, returns it frozen in a TeacherRunner.

    Where each teacher setting comes from:
      - num_layers / hidden_size / num_attention_heads / num_experts: the teacher flags; a flag left unset takes
        the checkpoint's recorded value; a flag that disagrees with the checkpoint fails with one line naming it.
      - everything else in ModelConfig (ffn size, position type and table, rotary base, eps, ...): the
        teacher checkpoint's recorded config, since it describes the weights; dropout is 0 (eval anyway).
      - MoEConfig: the checkpoint's recorded moe config (capacity factors, top-k, interval, mlp type, ...) with
        ep_size=1: every rank holds a full teacher replica and runs all its experts. In eval mode the MoE layers
        use the recorded eval capacity factor.
      - padded vocabulary: must equal the student's (same tokenizer and padding), since the KL compares the
        two distributions column by column; with `vocab_size` (the true vocabulary) given, the paddings may
        differ (a TP=1 teacher for a tensor-parallel student, padded to a multiple of divisible-by x TP) as long
        as both cover it: columns past the true vocabulary are excluded from the KL.
    Args:
      cfg: the distillation config (cfg.load_teacher must be set).
      padded_vocab_size: the student's padded vocabulary size.
      device: where the teacher lives (default CPU).
      seq_length: the student's --seq-length; checked against the teacher's learned position table.
      vocab_size: the tokenizer's true vocabulary size (relaxes the padded-vocabulary check, see above).
      dtype: the student's compute dtype; a bf16/fp16 student gets a teacher whose weights are cast to it once (the
        teacher only runs forward, so it needs no fp32 master copy).
    Raises:
      CheckpointError (a ValueError; one line) for an unreadable or mismatching teacher checkpoint.
    """
    assert cfg.load_teacher, "DistillConfig requires --load-teacher whenever --mos or --kd is given"
    def configs_to_model(configs: dict, ckpt_dir: str):
        if "model" not in configs:
            raise CheckpointError(f"--load-teacher {ckpt_dir}: no model configuration recorded; not a megatron-moe "
                                  f"checkpoint")
        return (teacher_model_config(cfg, configs["model"], padded_vocab_size, ckpt_dir, seq_length, vocab_size),
                teacher_moe_config(cfg, configs.get("moe"), ckpt_dir))

    # any TP size (a whole teacher per rank); built under a forked RNG: the random init is overwritten by the
    # checkpoint, and not consuming the global generator keeps resume exact (the teacher is built after --load
    # restored the RNG state)
    loaded = build_model_from_checkpoint(cfg.load_teacher, device, flag="--load-teacher",
                                         configs_to_model=configs_to_model, keep_rng=True)
    return TeacherRunner(loaded.model, cfg, dtype)


def teacher_model_config(cfg: DistillConfig, recorded: dict, padded_vocab_size: int, ckpt_dir: str,
                         seq_length: Optional[int] = None, vocab_size: Optional[int] = None) -> ModelConfig:
    """The recorded ModelConfig, checked against the teacher flags and the student's vocabulary/sequence."""
    fields = dict(recorded)
    for flag, ours, theirs in _TEACHER_FLAGS:
        given = getattr(cfg, ours)
        if given is not None and theirs in fields and given != fields[theirs]:
            raise CheckpointError(f"{flag} ({given}) does not match the teacher checkpoint {ckpt_dir}, which has "
                                  f"{theirs}={fields[theirs]}; set {flag} {fields[theirs]}")
    teacher_vocab = fields.get("padded_vocab_size")
    covers = vocab_size is not None and teacher_vocab is not None and teacher_vocab >= vocab_size
    if teacher_vocab != padded_vocab_size and not covers:
        raise CheckpointError(f"--load-teacher {ckpt_dir}: the teacher's padded vocabulary "
                              f"({fields.get('padded_vocab_size')}) differs from the student's ({padded_vocab_size});"
                              f" teacher and student need the same tokenizer and --make-vocab-size-divisible-by")
    if (seq_length is not None and fields.get("position_embedding_type", "learned_absolute") == "learned_absolute"
            and fields.get("max_position_embeddings", seq_length) < seq_length):
        raise CheckpointError(f"--seq-length ({seq_length}) exceeds the teacher's --max-position-embeddings "
                              f"({fields['max_position_embeddings']}) recorded in {ckpt_dir}; use a shorter "
                              f"--seq-length or a teacher trained with a longer position table")
    return ModelConfig.from_recorded(fields, hidden_dropout=0.0, attention_dropout=0.0)


def teacher_moe_config(cfg: DistillConfig, recorded: Optional[dict], ckpt_dir: str) -> Optional[MoEConfig]:
    """The recorded MoEConfig (None for a dense teacher), checked against --num-experts-teacher; ep_size 1."""
    saved_experts = tuple(recorded["num_experts"]) if recorded else (1,)
    given = cfg.num_experts_teacher
    if given is not None and tuple(given) != saved_experts:
        raise CheckpointError(f"--num-experts-teacher ({list(given)}) does not match the teacher checkpoint "
                              f"{ckpt_dir}, which has num_experts={list(saved_experts)}; set --num-experts-teacher "
                              f"{' '.join(map(str, saved_experts))}")
    if not recorded:
        return None
    # a full teacher replica per rank; TODO(MoS issue): shard large MoE teachers over the student's EP group
    try:  # moe/ raises ValueError (it cannot import megatron.errors)
        return MoEConfig.from_recorded(recorded, ep_size=1)
    except ValueError as e:
        raise CheckpointError(f"--load-teacher {ckpt_dir}: recorded MoE configuration rejected: {e}") from None
