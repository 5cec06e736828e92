"""Everything before the first step: flags -> config -> process groups -> model, optimizer, scheduler, loss scaler,
--load, teacher, data iterators (used by megatron.training.pretrain and tools/lr_range_test.py)."""
from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron import checkpointing, device_settings, parallel_state
from megatron.arguments import configure
from megatron.config import TrainConfig
from megatron.errors import ConfigError
from megatron.flops import peak_flops
from megatron.model import GPTModel
from megatron.optimizer import ConstantLossScaler, DynamicLossScaler, OptimizerParamScheduler, build_optimizer
from megatron.train_state import TrainState, closed_on_error
from megatron.rank0 import log_rank0, print_rank0
from megatron.training_log import open_writer

log = logging.getLogger("megatron")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.optimizer.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if cfg.optimizer.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the GEMMs run in: bf16/fp16 under --bf16/--fp16 autocast, else fp32."""
    return torch.bfloat16 if cfg.optimizer.bf16 else torch.float16 if cfg.optimizer.fp16 else torch.float32


def build_model(cfg: TrainConfig, groups, device) -> torch.nn.Module:
    """The whole GPT, or at --pipeline-model-parallel-size > 1 this rank's stage of it (megatron/pipeline)."""
    if groups is not None and groups.pp_size > 1:
        from megatron.pipeline import build_stage_model

        return build_stage_model(cfg, groups, device)
    return GPTModel(cfg.model, cfg.moe, groups).to(device)


def build_pipeline(cfg: TrainConfig, model, groups, device):
    """The schedules of this rank's stage (None at --pipeline-model-parallel-size 1)."""
    if groups is None or groups.pp_size == 1:
        return None
    from megatron.pipeline import Pipeline, rank_chunks

    return Pipeline(model, rank_chunks(cfg, groups.pp_rank), groups, device, cfg.moe, cfg.data.micro_batch_size,
                    cfg.data.seq_length, cfg.model.hidden_size, cfg.parallel.pipeline_schedule,
                    autocast=lambda: autocast_context(cfg, device))


def setup_train_state(cfg: TrainConfig, groups, device, tokenizer=None) -> TrainState:
    """Model, optimizer, scheduler and scaler from the config; loads --load when given. The optimizer's close()
    goes on the state's `resources` at once, so that a failure further on releases an offload store."""
    set_seed(cfg.data.seed)
    device_settings.apply(cfg.tf32, cfg.deterministic)  # TF32 (--no-tf32), --deterministic
    model = build_model(cfg, groups, device)
    optimizer = build_optimizer(model, cfg.optimizer, groups, cfg.parallel.zero_stage, cfg.optimizer_offload,
                                groups.rank, groups.world_size)
    resources = contextlib.ExitStack()
    resources.callback(optimizer.close)
    with closed_on_error(resources):
        st = TrainState(cfg, model, optimizer, OptimizerParamScheduler(optimizer, cfg.optimizer, cfg.scheduler),
                        _loss_scaler(cfg), groups, device, tokenizer, resources=resources)
        st.pipeline = build_pipeline(cfg, model, groups, device)
        st.checkpoints = checkpoint_manager(st)
        _load_and_teacher(st)
        if st.iteration:  # the checkpoint just loaded is not written again (a resumed run that is already done)
            st.checkpoints.last_saved = st.iteration
        if cfg.compile:
            st.model = torch.compile(model)
        return st


def _loss_scaler(cfg: TrainConfig):
    o = cfg.optimizer
    if not o.fp16:
        return None
    return (ConstantLossScaler(o.loss_scale) if o.loss_scale else
            DynamicLossScaler(o.initial_loss_scale, o.min_loss_scale, o.loss_scale_window, o.hysteresis))


def _load_and_teacher(st: TrainState) -> None:
    cfg = st.cfg
    if cfg.checkpoint.load:
        missing = checkpointing.nothing_to_load(cfg.checkpoint.load)
        if missing is None:
            load_into_state(st)
        else:  # Megatron: warn and start from scratch
            log_rank0(log, logging.WARNING, "WARNING: --load %s: %s; starting from scratch", cfg.checkpoint.load,
                      missing)
    d = cfg.distill
    if d.enabled and not d.kd_stopped(st.iteration, st.consumed_tokens):
        from megatron.distillation import load_teacher

        st.teacher = load_teacher(d, cfg.model.padded_vocab_size, st.device, cfg.data.seq_length,
                                  st.tokenizer.vocab_size if st.tokenizer is not None else None, compute_dtype(cfg))


def load_into_state(st: TrainState) -> None:
    restored = checkpointing.load_training_checkpoint(st.cfg, st.model, st.optimizer, st.scheduler, st.loss_scaler,
                                                      st.groups)
    if restored is not None:
        st.iteration = restored["iteration"]
        st.consumed_samples, st.consumed_tokens = restored["consumed_samples"], restored["consumed_tokens"]
    print_rank0(f"loaded checkpoint {st.cfg.checkpoint.load} at iteration {st.iteration} "
                f"(consumed samples {st.consumed_samples})")


def build_data_iterators(st: TrainState):
    """(train iterator from consumed_samples, factory for a fresh validation iterator, test factory)."""
    from megatron.data import build_pretraining_data_loader, build_train_valid_test_datasets, user_errors_unwrapped

    cfg, g = st.cfg, st.groups
    if not cfg.data.data_path:
        raise ConfigError("--data-path is required for training")
    eval_samples = cfg.logging.eval_iters * cfg.data.micro_batch_size * g.dp_size
    sc = cfg.scheduler  # sample-based training indexes --train-samples samples (Megatron)
    train_samples = sc.train_samples if sc.sample_based else sc.train_iters * cfg.data.global_batch_size
    num_samples = (train_samples, eval_samples, eval_samples)
    barrier = (lambda: dist.barrier()) if dist.is_initialized() and dist.get_world_size() > 1 else None
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        list(cfg.data.data_path), cfg.data.split, num_samples, cfg.data.seq_length, cfg.data.seed,
        cache_dir=cfg.data.data_cache_path, barrier=barrier, rank=g.rank,
        vocab_size=st.tokenizer.vocab_size if st.tokenizer is not None else None)
    if train_ds is None:
        raise ConfigError(f"--split {cfg.data.split} leaves no training documents")

    def loader(ds, consumed):
        return build_pretraining_data_loader(ds, consumed, cfg.data.micro_batch_size, g.dp_rank, g.dp_size,
                                             cfg.data.num_workers)

    train_iter = user_errors_unwrapped(loader(train_ds, st.consumed_samples))
    valid = (lambda: user_errors_unwrapped(loader(valid_ds, 0))) if valid_ds is not None and len(valid_ds) > 0 else None
    test = (lambda: user_errors_unwrapped(loader(test_ds, 0))) if test_ds is not None and len(test_ds) > 0 else None
    return train_iter, valid, test


def setup_from_argv(argv=None):
    """Flags -> (TrainState with model, optimizer and scheduler loaded from --load, train iterator, validation and
    test iterator factories): everything before the first step (also used by tools/lr_range_test.py)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, tokenizer, notes = configure(argv, parallel_state.world_size())  # every check runs here, before anything
    device_settings.set_cublas_workspace(cfg.deterministic)  # before CUDA starts (init_distributed picks the GPU)
    timeout = cfg.parallel.distributed_timeout_minutes
    _, world_size, device = parallel_state.init_distributed(cfg.parallel.distributed_backend, timeout)
    for note in notes:  # flags and ds_config keys that change nothing here: said once
        log_rank0(log, logging.WARNING, "%s", note)
    groups = parallel_state.initialize(cfg.parallel.tensor_model_parallel_size,
                                       cfg.moe.ep_size if cfg.moe else (1,), timeout,
                                       cp_size=cfg.parallel.context_parallel_size,
                                       etp_size=cfg.parallel.expert_tensor_parallel_size,
                                       pp_size=cfg.parallel.pipeline_model_parallel_size,
                                       sequence_parallel=cfg.parallel.sequence_parallel)
    st = setup_train_state(cfg, groups, device, tokenizer)
    with closed_on_error(st.resources):
        _report(st, world_size)
        st.peak_flops, source = peak_flops(device, compute_dtype(cfg), cfg.tf32, cfg.logging.peak_flops)
        print_rank0(f"> peak for MFU: {st.peak_flops / 1e12:.3f} TFLOP/s per device ({source})")
        st.writer = open_writer(cfg)
        train_iter, make_valid, make_test = build_data_iterators(st)
    return st, train_iter, make_valid, make_test


def _report(st: TrainState, world_size: int) -> None:
    cfg, groups = st.cfg, st.groups
    n_params = sum(p.numel() for p in st.model.parameters())
    print_rank0(f"> model: {n_params / 1e6:.2f}M parameters on rank 0 | world {world_size} | dp {groups.dp_size} "
                f"| global batch {st.global_batch_size} = micro {cfg.data.micro_batch_size} x dp "
                f"{groups.dp_size} x accumulation {st.num_micro_batches}")
    if cfg.data.rampup_batch_size is not None:
        start, inc, ramp = cfg.data.rampup_batch_size
        print_rank0(f"> batch size ramp-up from {start} to {cfg.data.global_batch_size} by {inc} over {ramp} samples "
                    f"({cfg.scheduler.train_iters} iterations in all)")
    if cfg.curriculum is not None:
        c = cfg.curriculum
        print_rank0(f"> seqlen curriculum ({c.schedule_type}): {c.min_difficulty} -> {c.max_difficulty} tokens "
                    f"over {c.total_curriculum_step} iterations")


# ------------------------------------------------------------------- checkpoints: the manager and its Statefuls
class _Counters:
    """The consumed-data counters of a TrainState, as a Stateful the checkpoint records under "counters"."""

    def __init__(self, st: TrainState):
        self.st = st

    def state_dict(self) -> dict:
        return {"consumed_samples": self.st.consumed_samples, "consumed_tokens": self.st.consumed_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.st.consumed_samples, self.st.consumed_tokens = state["consumed_samples"], state["consumed_tokens"]


def checkpoint_manager(st: TrainState) -> checkpointing.CheckpointManager:
    ck = st.cfg.checkpoint
    m = checkpointing.CheckpointManager(ck.save, ck.save_interval, st.model, st.optimizer, st.groups,
                                        checkpointing.configs_for_checkpoint(st.cfg), async_save=ck.async_save)
    m.register("scheduler", st.scheduler)
    m.register("loss_scaler", st.loss_scaler)
    m.register("counters", _Counters(st))
    return m
