"""Training loop: setup from TrainConfig, the train step, evaluation, logging and checkpoint cadence."""
from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron import checkpointing, grad_sync, parallel_state
from megatron.arguments import configure
from megatron.config import TrainConfig
from megatron.errors import ConfigError, UserError
from megatron.curriculum import scheduled_seqlen, truncate
from megatron.microbatches import global_batch_size_at
from megatron.flops import measure_gemm_peak
from megatron.training_guards import ExitSignals, NonFiniteError, describe_non_finite, exit_reason
from megatron.training_log import (format_log, open_writer, print_rank0, summarize_moe, write_optimizer_states,
                                   write_tensorboard)
from megatron.model import GPTModel
from megatron.model.fused_lm_loss import DistillTarget
from megatron.optimizer import (ConstantLossScaler, DynamicLossScaler, OptimizerParamScheduler, ZeroOptimizer,
                                build_optimizer, clip_grad_norm)
from megatron.optimizer.grad_scaler import unscale_and_check
from megatron.optimizer.offload import ExpertOffloadAdamW
from moe.offload.store import OffloadError

log = logging.getLogger("megatron")


# ------------------------------------------------------------------------------------------------ state
@dataclass
class TrainState:
    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: OptimizerParamScheduler
    loss_scaler: Optional[object]
    groups: parallel_state.ParallelGroups
    device: torch.device
    tokenizer: Optional[object] = None
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    params: Optional[grad_sync.ParamSplit] = None  # the model's parameters by how they are synchronised
    writer: Optional[object] = None
    peak_flops: Optional[float] = None
    teacher: Optional[object] = None  # moe.distill.TeacherRunner while distilling (MoS / KD)
    timers: dict = field(default_factory=dict)  # phase -> seconds summed since the last log line
    checkpoints: Optional[checkpointing.CheckpointManager] = None  # --save: maybe_save each iteration

    @property
    def global_batch_size(self) -> int:
        """The global batch of the next step (grows under --rampup-batch-size)."""
        return global_batch_size_at(self.consumed_samples, self.cfg.data)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.cfg.data.micro_batch_size * self.groups.dp_size)

    @property
    def seq_length(self) -> int:
        """Tokens per sample of the next step: the scheduled length under a seqlen curriculum."""
        cur = self.cfg.curriculum
        return self.cfg.data.seq_length if cur is None else min(scheduled_seqlen(cur, self.iteration + 1),
                                                                  self.cfg.data.seq_length)

    def done(self) -> bool:
        """--train-iters reached, or --train-tokens consumed (Megatron-DeepSpeed stops at whichever comes first)."""
        sc = self.cfg.scheduler
        return self.iteration >= sc.train_iters or (sc.train_tokens is not None
                                                    and self.consumed_tokens >= sc.train_tokens)


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
    return GPTModel(cfg.model, cfg.moe, groups).to(device)


def setup_train_state(cfg: TrainConfig, groups, device, tokenizer=None) -> TrainState:
    """Model, optimizer, scheduler and scaler from the config; loads --load when given."""
    set_seed(cfg.data.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    model = build_model(cfg, groups, device)
    optimizer = build_optimizer(model, cfg.optimizer, groups, cfg.parallel.zero_stage, cfg.optimizer_offload,
                                groups.rank, groups.world_size)
    with release_offload_on_error(optimizer):
        return _finish_setup(cfg, groups, device, tokenizer, model, optimizer)


@contextlib.contextmanager
def release_offload_on_error(optimizer):
    """An error inside closes an ExpertOffloadAdamW's store (its lock), so that the offload directory is free for the
    next run in this process (tests, tools calling main twice); the process exiting would release it too."""
    try:
        yield
    except BaseException:
        if isinstance(optimizer, ExpertOffloadAdamW):
            optimizer.close()
        raise


def _finish_setup(cfg: TrainConfig, groups, device, tokenizer, model, optimizer) -> TrainState:
    scheduler = OptimizerParamScheduler(optimizer, cfg.optimizer, cfg.scheduler)
    scaler = None
    if cfg.optimizer.fp16:
        scaler = (ConstantLossScaler(cfg.optimizer.loss_scale) if cfg.optimizer.loss_scale else
                  DynamicLossScaler(cfg.optimizer.initial_loss_scale, cfg.optimizer.min_loss_scale,
                                    cfg.optimizer.loss_scale_window, cfg.optimizer.hysteresis))
    st = TrainState(cfg, model, optimizer, scheduler, scaler, groups, device, tokenizer)
    st.params = grad_sync.split_params(model)
    st.checkpoints = checkpoint_manager(st)
    if cfg.checkpoint.load:
        missing = checkpointing.nothing_to_load(cfg.checkpoint.load)
        if missing is None:
            load_into_state(st)
        elif not dist.is_initialized() or dist.get_rank() == 0:  # Megatron: warn and start from scratch
            log.warning(f"WARNING: --load {cfg.checkpoint.load}: {missing}; starting from scratch")
    d = cfg.distill
    if d.enabled and not d.kd_stopped(st.iteration, st.consumed_tokens):
        from megatron.distillation import load_teacher

        st.teacher = load_teacher(d, cfg.model.padded_vocab_size, device, cfg.data.seq_length,
                                  tokenizer.vocab_size if tokenizer is not None else None, compute_dtype(cfg))
    if cfg.compile:
        st.model = torch.compile(model)
    return st


def load_into_state(st: TrainState) -> None:
    restored = checkpointing.load_training_checkpoint(st.cfg, st.model, st.optimizer, st.scheduler, st.loss_scaler,
                                                      st.groups)
    if restored is not None:
        st.iteration = restored["iteration"]
        st.consumed_samples, st.consumed_tokens = restored["consumed_samples"], restored["consumed_tokens"]
    print_rank0(f"loaded checkpoint {st.cfg.checkpoint.load} at iteration {st.iteration} "
                f"(consumed samples {st.consumed_samples})")


def settle(st: TrainState) -> None:
    """Waits for an offloaded expert step still running behind the training thread (--moe-offload-optimizer nvme
    with overlap): before anything reads all the weights or the optimizer state (checkpoints, evaluation, the end)."""
    if isinstance(st.optimizer, ExpertOffloadAdamW):
        st.optimizer.synchronize()


# --- checkpoint call sites (ckpt): the manager and what the loop registers with it --------------------------------
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
# --- end of checkpoint call sites ----------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------ step
def get_batch(data: dict, device, eod: Optional[int], eod_mask_loss: bool):
    """text [b, s+1] -> tokens [b, s], labels [b, s], loss_mask [b, s] (fp32)."""
    text = data["text"].to(device, non_blocking=True).long()
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=device)
    if eod_mask_loss and eod is not None:
        loss_mask[tokens == eod] = 0.0
    return tokens, labels, loss_mask


def forward_loss(st: TrainState, tokens, labels, loss_mask):
    """Returns (total, lm loss, moe stats, kd term or None); total = [alpha·]lm [+ beta·T²·KL] + coeff·Σ aux (+ z).

    While a teacher is active (MoS/KD before the staged stop) it runs first (inference mode, compute dtype) and the
    student's LM loss and KL are one fused head loss; otherwise the fused LM-head loss alone. Neither materialises
    more than the student's logits buffer.
    """
    distil = st.teacher is not None and st.model.training and st.teacher.active(st.iteration, st.consumed_tokens)
    target = None
    with autocast_context(st.cfg, st.device):
        if distil:
            target = distill_target(st, tokens, loss_mask)
        out = st.model(tokens, labels, parallel_output=True, distill_target=target)
    lm_loss = (out.loss * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    total, kd_term = lm_loss, None
    if distil:
        total = out.kd_total
        T = st.cfg.distill.kd_temp
        kd_term = T * T * (out.kl * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
    moe = st.cfg.moe
    if moe is not None and out.moe_stats:
        total = total + moe.loss_coeff * sum(s.aux_loss for s in out.moe_stats)
        if moe.z_loss_coeff:
            total = total + moe.z_loss_coeff * sum(s.z_loss for s in out.moe_stats)
    return total, lm_loss, out.moe_stats, kd_term


def distill_target(st: TrainState, tokens, loss_mask) -> DistillTarget:
    """The teacher's logits for this micro-batch and the KD weights, for the student's fused head loss.

    With TP the student's head is this rank's vocabulary slice; the (whole, TP=1) teacher's logits are cut to the
    same slice (or padded to the student's padding). Padded vocabulary columns are excluded from the KL.
    """
    g, d = st.groups, st.cfg.distill
    width = st.cfg.model.padded_vocab_size // g.tp_size
    teacher_logits = vocab_slice(st.teacher.forward(tokens), g.tp_rank * width, width)  # a view when paddings agree
    return DistillTarget(teacher_logits, loss_mask, d.kd_temp, d.kd_alpha_ce, d.kd_beta_ce,
                         st.tokenizer.vocab_size if st.tokenizer is not None else None)


def vocab_slice(logits: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Columns [start, start + width) of full-vocabulary logits; columns past their padded vocabulary (a teacher
    padded for fewer TP ranks) are zeros: they lie beyond the true vocabulary, which the KL masks out."""
    cols = logits[..., start:start + width]
    if cols.shape[-1] < width:
        cols = torch.nn.functional.pad(cols, (0, width - cols.shape[-1]))
    return cols


def train_step(st: TrainState, data_iter: Iterator) -> dict:
    cfg = st.cfg
    st.model.train()
    st.optimizer.zero_grad(set_to_none=True)
    gbs, n_micro, seqlen = st.global_batch_size, st.num_micro_batches, st.seq_length
    scale = st.loss_scaler.scale if st.loss_scaler is not None else 1.0
    lm_sum = torch.zeros((), device=st.device)
    moe_logs: List[List] = []
    kd_sum = None
    t = time.perf_counter()
    for _ in range(n_micro):
        tokens, labels, mask = get_batch(next(data_iter), st.device, _eod(st), cfg.data.eod_mask_loss)
        # seqlen curriculum: every micro-batch cut to the scheduled length (Megatron-DeepSpeed's legacy curriculum)
        tokens, labels, mask = truncate(tokens, labels, mask, seqlen)
        total, lm_loss, stats, kd_term = forward_loss(st, tokens, labels, mask)
        (total * (scale / n_micro)).backward()
        lm_sum += lm_loss.detach()
        if kd_term is not None:
            kd_sum = kd_term.detach() + (kd_sum if kd_sum is not None else 0.0)
        moe_logs.append([x._replace(aux_loss=x.aux_loss.detach(), z_loss=torch.as_tensor(x.z_loss).detach())
                         for x in stats])
    t = _tick(st, "forward-backward", t)
    # ZeRO-2 reduce-scatters: each rank keeps the reduced gradients of the slice it owns (megatron/optimizer/zero.py)
    sharded_grads = isinstance(st.optimizer, ZeroOptimizer) and st.optimizer.stage == 2
    if sharded_grads:
        st.optimizer.reduce_gradients()
    else:
        grad_sync.reduce_gradients(st.params, st.groups)
    t = _tick(st, "grads-all-reduce", t)
    found_inf = False
    if st.loss_scaler is not None:
        found_inf = unscale_and_check(st.optimizer.shard_params() if sharded_grads else st.model.parameters(), scale)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if found_inf else 0.0], device=st.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found_inf = bool(flag.item())
        st.loss_scaler.update(found_inf)
    grad_norm = float("nan")
    if not found_inf:
        grad_norm = (st.optimizer.clip_grad_norm(cfg.optimizer.clip_grad) if sharded_grads else
                     clip_grad_norm(st.params.replicated, grad_sync.norm_groups(st.params, st.groups),
                                    cfg.optimizer.clip_grad))
        if st.loss_scaler is None and cfg.optimizer.check_for_nan_in_loss_and_grad and not math.isfinite(grad_norm):
            # the norm is global (reduced over every group), so every rank stops here together
            raise NonFiniteError(describe_non_finite(st, lm_sum, moe_logs, grad_norm))
        st.optimizer.step()
    # a step skipped for an fp16 overflow does not advance the LR schedule (Megatron-LM): the schedule counts
    # optimizer updates, so the next successful step gets the LR the skipped one would have had
    # the scheduler counts samples of this update and the tokens consumed before it (Megatron-DeepSpeed)
    lr = st.scheduler.get_lr() if found_inf else st.scheduler.step(1, samples=gbs, tokens=st.consumed_tokens)
    _tick(st, "optimizer", t)
    st.iteration += 1
    st.consumed_samples += gbs
    st.consumed_tokens += gbs * seqlen
    lm = lm_sum / n_micro
    if st.groups.dp_size > 1:
        dist.all_reduce(lm, group=st.groups.dp_group)
        lm /= st.groups.dp_size
    return {"lm_loss": float(lm), "lr": lr, "grad_norm": grad_norm, "skipped": found_inf,
            "loss_scale": scale, "moe_raw": moe_logs, "batch_size": gbs, "seqlen": seqlen,
            "kd_loss": float(kd_sum / n_micro) if kd_sum is not None else None}


def _tick(st: TrainState, phase: str, since: float) -> float:
    """Adds the time since `since` to `phase` (--log-timers-to-tensorboard, ds_config wall_clock_breakdown)."""
    lg = st.cfg.logging
    if st.device.type == "cuda" and (lg.log_timers_to_tensorboard or lg.wall_clock_breakdown):
        torch.cuda.synchronize(st.device)  # kernels are asynchronous: time what ran, not what was queued
    now = time.perf_counter()
    st.timers[phase] = st.timers.get(phase, 0.0) + now - since
    return now


def _eod(st: TrainState) -> Optional[int]:
    return getattr(st.tokenizer, "eod", None)


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(st: TrainState, make_iter: Callable[[], Iterator], eval_iters: int) -> Optional[float]:
    """Mean lm loss over the first `eval_iters` validation micro-batches per rank (the same ones each time)."""
    if eval_iters <= 0:
        return None
    st.model.eval()
    it = make_iter()
    total, n = torch.zeros((), device=st.device), 0
    for _ in range(eval_iters):
        try:
            data = next(it)
        except StopIteration:
            break
        tokens, labels, mask = get_batch(data, st.device, _eod(st), st.cfg.data.eod_mask_loss)
        _, lm_loss, _, _ = forward_loss(st, tokens, labels, mask)
        total += lm_loss.float()
        n += 1
    st.model.train()
    if n == 0:
        return None
    loss = total / n
    if st.groups.dp_size > 1:
        dist.all_reduce(loss, group=st.groups.dp_group)
        loss /= st.groups.dp_size
    return float(loss)


# ------------------------------------------------------------------------------------------------ loop
def train(st: TrainState, train_iter: Iterator, make_valid_iter: Optional[Callable[[], Iterator]],
          signals: Optional[ExitSignals] = None, start: Optional[float] = None) -> dict:
    cfg, lg = st.cfg, st.cfg.logging
    start = time.time() if start is None else start
    t0, last_logged, tokens0 = time.perf_counter(), st.iteration, st.consumed_tokens
    st.timers.clear()
    losses: List[float] = []
    last_val = None
    while not st.done():
        m = train_step(st, train_iter)
        losses.append(m["lm_loss"])
        if st.iteration % lg.log_interval == 0:
            m["moe"] = summarize_moe(m.pop("moe_raw"))  # only on logging steps: it syncs on every stat
            if isinstance(st.optimizer, ExpertOffloadAdamW):  # swap traffic and exposed time since the last log
                m["offload"] = st.optimizer.take_stats()
            elapsed = time.perf_counter() - t0
            iters, tokens = st.iteration - last_logged, st.consumed_tokens - tokens0
            m["timers_ms"] = {k: 1000.0 * v / iters for k, v in st.timers.items()}
            print_rank0(format_log(st, m, elapsed, iters, tokens))
            write_tensorboard(st, m, tokens / elapsed if elapsed > 0 else None, 1000.0 * elapsed / iters)
            if lg.log_optimizer_states_to_tensorboard:
                write_optimizer_states(st)
            t0, last_logged, tokens0 = time.perf_counter(), st.iteration, st.consumed_tokens
            st.timers.clear()
        if make_valid_iter is not None and st.iteration % lg.eval_interval == 0:
            last_val = report_validation(st, make_valid_iter, f"iteration {st.iteration}")
        reason = exit_reason(st, signals, start) if not st.done() else None
        st.checkpoints.maybe_save(st.iteration, force=reason is not None)  # on its interval, and before an exit
        if reason is not None:
            print_rank0(f"exiting at iteration {st.iteration} ({reason})")
            settle(st)
            return {"losses": losses, "val_loss": last_val, "exited": True}
    settle(st)
    return {"losses": losses, "val_loss": last_val, "exited": False}


def report_validation(st: TrainState, make_iter, where: str) -> Optional[float]:
    settle(st)
    loss = evaluate(st, make_iter, st.cfg.logging.eval_iters)
    if loss is not None:
        ppl = math.exp(min(20.0, loss))
        print_rank0(f" validation loss at {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E}")
        if st.writer is not None:
            st.writer.add_scalar("validation/lm-loss", loss, st.iteration)
            st.writer.add_scalar("validation/lm-loss vs samples", loss, st.consumed_samples)
            if st.cfg.logging.log_validation_ppl_to_tensorboard:
                st.writer.add_scalar("validation/lm-ppl", ppl, st.iteration)
                st.writer.add_scalar("validation/lm-ppl vs samples", ppl, st.consumed_samples)
    return loss


# ------------------------------------------------------------------------------------------------ entry
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


def pretrain(argv=None) -> dict:
    """pretrain_gpt.py's body: flags -> checked config -> groups -> model/optimizer -> data -> train -> eval."""
    start = time.time()  # --exit-duration-in-mins counts from here (Megatron's _TRAIN_START_TIME)
    st, train_iter, make_valid, make_test = setup_from_argv(argv)
    cfg = st.cfg
    signals = ExitSignals() if cfg.logging.exit_signal_handler else None
    ok = False
    try:  # (ckpt) a pending --async-save write is finished, and committed, before pretrain returns or raises
        try:
            with release_offload_on_error(st.optimizer):  # a failed run leaves its offload directory free
                result = train(st, train_iter, make_valid, signals, start)
        finally:
            if signals is not None:
                signals.restore()
        if not result["exited"]:
            st.checkpoints.maybe_save(st.iteration, force=st.iteration > 0)  # (async: written behind the evals)
            if make_valid is not None:
                result["val_loss"] = report_validation(st, make_valid, "the end of training (validation set)")
            if make_test is not None:
                result["test_loss"] = report_validation(st, make_test, "the end of training (test set)")
        ok = True
    finally:
        st.checkpoints.close(ok)
    if st.writer is not None:
        st.writer.close()
    result["state"] = st
    return result


def setup_from_argv(argv=None):
    """Flags -> (TrainState with model, optimizer and scheduler loaded from --load, train iterator, validation and
    test iterator factories): everything before the first step (also used by tools/lr_range_test.py)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, tokenizer, notes = configure(argv, parallel_state.world_size())  # every check runs here, before anything
    rank, world_size, device = parallel_state.init_distributed(cfg.parallel.distributed_backend)
    for note in notes:  # flags and ds_config keys that change nothing here: said once
        if rank == 0:
            log.warning(note)
    groups = parallel_state.initialize(cfg.parallel.tensor_model_parallel_size,
                                       cfg.moe.ep_size if cfg.moe else (1,))
    st = setup_train_state(cfg, groups, device, tokenizer)
    with release_offload_on_error(st.optimizer):
        return _report_and_data(st, cfg, world_size, groups, device)


def _report_and_data(st: TrainState, cfg: TrainConfig, world_size: int, groups, device):
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
    st.peak_flops = cfg.logging.peak_flops or measure_gemm_peak(device=device)
    print_rank0(f"> peak fp32 GEMM for MFU: {st.peak_flops / 1e12:.3f} TFLOP/s per device")
    st.writer = open_writer(cfg)
    train_iter, make_valid, make_test = build_data_iterators(st)
    return st, train_iter, make_valid, make_test


def main(argv=None) -> int:
    """CLI wrapper: a problem the user can fix (megatron.errors.UserError: a flag, file, checkpoint or dataset)
    prints one line and exits 2; anything else is a bug and keeps its traceback."""
    try:
        st = pretrain(argv)["state"]
        if isinstance(st.optimizer, ExpertOffloadAdamW):
            st.optimizer.close()
    except (UserError, OffloadError) as e:  # OffloadError: moe's own (--moe-offload-optimizer)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
