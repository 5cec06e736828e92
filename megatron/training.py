"""The training loop and the train step (setup: training_setup.py; state: train_state.py; exit guards and logs:
training_guards.py, training_log.py)."""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron import checkpointing
from megatron.curriculum import truncate
from megatron.context_parallel import finalize_model_grads
from megatron.errors import UserError
from megatron.model.fused_lm_loss import DistillTarget
from megatron.train_state import TrainState, closed_on_error
from megatron.training_guards import ExitSignals, NonFiniteError, describe_non_finite, exit_reason
from megatron.rank0 import print_rank0
from megatron.training_log import format_log, summarize_moe, write_optimizer_states, write_tensorboard
from megatron.training_setup import (autocast_context, build_model, compute_dtype, set_seed,  # noqa: F401
                                     setup_from_argv, setup_train_state)  # (entry points tests and tools import here)
from moe import gating as moe_gating
from moe.offload.store import OffloadError

log = logging.getLogger("megatron")




def maybe_save(st: TrainState, force: bool = False) -> None:
    """The save cadence, in one place (megatron.checkpointing.CheckpointManager): every --save-interval
    iterations, and when `force` (the run exits or ends) unless this iteration was just saved; with --async-save
    written behind the next steps. Nothing without --save."""
    st.checkpoints.maybe_save(st.iteration, force=force)


# ------------------------------------------------------------------------------------------------ step
def get_batch(data: dict, device, eod: Optional[int], eod_mask_loss: bool):
    """text [b, s+1] -> tokens [b, s], labels [b, s], loss_mask [b, s] (fp32)."""
    text = data["text"].to(device, non_blocking=True).long()
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones(labels.shape, dtype=torch.float32, device=device)
    if eod_mask_loss and eod is not None:
        loss_mask.masked_fill_(tokens == eod, 0.0)  # not a boolean-mask index: no host sync on CUDA
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
    """One iteration: forward and backward of every micro-batch, the optimizer's step (reduce, unscale, clip,
    update: megatron/optimizer/base.py), the LR schedule; returns the iteration's metrics."""
    cfg = st.cfg
    st.model.train()
    st.optimizer.zero_grad(set_to_none=True)
    gbs, n_micro, seqlen = st.global_batch_size, st.num_micro_batches, st.seq_length
    scale = st.loss_scaler.scale if st.loss_scaler is not None else None
    lm_sum = torch.zeros((), device=st.device)
    moe_logs: List[List] = []
    kd_sum = None
    t = time.perf_counter()
    if st.pipeline is not None:  # --pipeline-model-parallel-size > 1: the schedule runs every micro-batch
        batches = [get_batch(next(data_iter), st.device, _eod(st), cfg.data.eod_mask_loss) for _ in range(n_micro)]
        lm_sum, moe_logs = st.pipeline.forward_backward(batches, scale or 1.0)
    for i in range(n_micro if st.pipeline is None else 0):
        tokens, labels, mask = get_batch(next(data_iter), st.device, _eod(st), cfg.data.eod_mask_loss)
        # seqlen curriculum: every micro-batch cut to the scheduled length (Megatron-DeepSpeed's legacy curriculum)
        tokens, labels, mask = truncate(tokens, labels, mask, seqlen)
        total, lm_loss, stats, kd_term = forward_loss(st, tokens, labels, mask)
        st.optimizer.before_backward(last_micro_batch=i == n_micro - 1)  # --overlap-grad-reduce starts in the last
        (total * ((scale or 1.0) / n_micro)).backward()
        lm_sum += lm_loss.detach()
        if kd_term is not None:
            kd_sum = kd_term.detach() + (kd_sum if kd_sum is not None else 0.0)
        moe_logs.append([x._replace(aux_loss=x.aux_loss.detach(), z_loss=torch.as_tensor(x.z_loss).detach())
                         for x in stats])
    finalize_model_grads(st.model, st.groups)  # --sequence-parallel / --context-parallel-size: partial sums
    t = _tick(st, "forward-backward", t)
    result = st.optimizer.step(scale)
    if result.non_finite:  # the norm is global (reduced over every group), so every rank stops here together
        raise NonFiniteError(describe_non_finite(st.iteration, st.groups.rank, lm_sum, moe_logs, result.grad_norm))
    if st.loss_scaler is not None:
        st.loss_scaler.update(result.overflow)
    # a step skipped for an fp16 overflow does not advance the LR schedule (Megatron-LM): the schedule counts
    # optimizer updates, so the next successful step gets the LR the skipped one would have had
    # the scheduler counts samples of this update and the tokens consumed before it (Megatron-DeepSpeed)
    lr = st.scheduler.step(1, samples=gbs, tokens=st.consumed_tokens) if result.stepped else st.scheduler.get_lr()
    t = _tick(st, "optimizer", t)
    if cfg.moe is not None:  # routers: expert-bias update (token counts summed over DP) and global-aux reset
        moe_gating.step_routers(st.model, st.groups.dp_group)
        if cfg.moe.router_input_whitening_refresh and st.pipeline is None:  # the whitening at the new parameters
            with autocast_context(st.cfg, st.device):  # (the last micro-batch's tokens; PP is refused)
                moe_gating.refresh_whitening(st.model, lambda: st.model(tokens))
            _tick(st, "router-refresh", t)
    st.iteration += 1
    st.consumed_samples += gbs
    st.consumed_tokens += gbs * seqlen
    lm = lm_sum / n_micro
    if st.groups.dp_size > 1:
        dist.all_reduce(lm, group=st.groups.dp_group)
        lm /= st.groups.dp_size
    return {"lm_loss": float(lm), "lr": lr, "grad_norm": result.grad_norm, "skipped": result.overflow,
            "loss_scale": scale or 1.0, "moe_raw": moe_logs, "batch_size": gbs, "seqlen": seqlen,
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
        lm_loss = (st.pipeline.eval_loss(tokens, labels, mask) if st.pipeline is not None
                   else forward_loss(st, tokens, labels, mask)[1])
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
    """Steps until done or an exit condition; logs, evaluates and saves on their cadences. Returns the per-step lm
    losses, the last validation loss and whether an exit condition (not the end) stopped the run."""
    lg = st.cfg.logging
    start = time.time() if start is None else start
    window = (time.perf_counter(), st.iteration, st.consumed_tokens)  # since the last log line
    st.timers.clear()
    losses: List[float] = []
    last_val, reason = None, None
    while not st.done():
        m = train_step(st, train_iter)
        losses.append(m["lm_loss"])
        if st.iteration % lg.log_interval == 0:
            window = log_iteration(st, m, window)
        if make_valid_iter is not None and st.iteration % lg.eval_interval == 0:
            last_val = report_validation(st, make_valid_iter, f"iteration {st.iteration}")
        reason = exit_reason(lg, st.iteration, signals, start, st.device) if not st.done() else None
        maybe_save(st, force=reason is not None or st.done())
        if reason is not None:
            print_rank0(f"exiting at iteration {st.iteration} ({reason})")
            break
    st.optimizer.synchronize()
    return {"losses": losses, "val_loss": last_val, "exited": reason is not None}


def log_iteration(st: TrainState, m: dict, window):
    """The log line and TensorBoard scalars of the iterations since `window` = (perf_counter, iteration, consumed
    tokens) at the last line; returns the new window."""
    m["moe"] = summarize_moe(m.pop("moe_raw"))  # only on logging steps: it syncs on every stat
    m["offload"] = st.optimizer.take_stats()  # swap traffic and exposed time since the last log (offload only)
    elapsed = time.perf_counter() - window[0]
    iters, tokens = st.iteration - window[1], st.consumed_tokens - window[2]
    m["timers_ms"] = {k: 1000.0 * v / iters for k, v in st.timers.items()}
    print_rank0(format_log(st.cfg, st.progress, st.groups.world_size, st.peak_flops, m, elapsed, iters, tokens))
    write_tensorboard(st.writer, st.cfg, st.progress, m, tokens / elapsed if elapsed > 0 else None,
                      1000.0 * elapsed / iters)
    if st.cfg.logging.log_optimizer_states_to_tensorboard:
        write_optimizer_states(st.writer, st.iteration, st.model, st.optimizer.state)
    st.timers.clear()
    return time.perf_counter(), st.iteration, st.consumed_tokens


def report_validation(st: TrainState, make_iter, where: str) -> Optional[float]:
    st.optimizer.synchronize()
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
def pretrain(argv=None) -> dict:
    """pretrain_gpt.py's body: flags -> checked config -> groups -> model/optimizer -> data -> train -> eval.
    The returned "state" still holds its resources (an offload store): main() closes them."""
    start = time.time()  # --exit-duration-in-mins counts from here (Megatron's _TRAIN_START_TIME)
    st, train_iter, make_valid, make_test = setup_from_argv(argv)
    signals = ExitSignals() if st.cfg.logging.exit_signal_handler else None
    ok = False
    try:  # a pending --async-save write is finished, and committed, before pretrain returns or raises
        with closed_on_error(st.resources):  # a failed run leaves its offload directory free for the next
            try:
                result = train(st, train_iter, make_valid, signals, start)
            finally:
                if signals is not None:
                    signals.restore()
            if not result["exited"]:
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


def main(argv=None) -> int:
    """CLI wrapper: a problem the user can fix (megatron.errors.UserError: a flag, file, checkpoint or dataset)
    prints one line and exits 2; anything else is a bug and keeps its traceback."""
    try:
        pretrain(argv)["state"].resources.close()
    except (UserError, OffloadError) as e:  # OffloadError: moe's own (--moe-offload-optimizer)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
