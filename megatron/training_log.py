"""Training logs: the per-iteration line (Megatron's format, MoE load per layer) and TensorBoard scalars."""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from megatron.config import TrainConfig
from megatron.flops import flops_per_token
from megatron.rank0 import is_rank0
from megatron.train_state import Progress


def summarize_moe(per_micro: List[List]) -> List[dict]:
    """Per MoE layer: aux loss, tokens-per-expert min/max/CV, fraction dropped (averaged over micro-batches)."""
    if not per_micro or not per_micro[0]:
        return []
    out = []
    for layer in range(len(per_micro[0])):
        stats = [m[layer] for m in per_micro]
        counts = torch.stack([s.tokens_per_expert.float() for s in stats]).sum(0)
        mean = counts.mean()
        out.append({"aux_loss": float(sum(float(s.aux_loss.detach()) for s in stats) / len(stats)),
                    "tokens_min": float(counts.min()), "tokens_max": float(counts.max()),
                    "tokens_cv": float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0,
                    "dropped": float(sum(float(s.dropped_fraction) for s in stats) / len(stats))})
    return out


def format_log(cfg: TrainConfig, at: Progress, world_size: int, peak_flops: Optional[float], m: dict, elapsed: float,
               iters: int, tokens: Optional[int] = None) -> str:
    """The iteration line at `at`; `tokens` were consumed over the `iters` iterations of `elapsed` seconds (default:
    full global batches of full sequences) on `world_size` devices; MFU against `peak_flops` per device."""
    if tokens is None:
        tokens = cfg.data.global_batch_size * cfg.data.seq_length * iters
    ms = 1000.0 * elapsed / max(iters, 1)
    tok_s = tokens / elapsed if elapsed > 0 else 0.0
    flops = flops_per_token(cfg.model, cfg.moe) * tok_s / max(world_size, 1)
    line = (f" iteration {at.iteration:8d}/{cfg.scheduler.train_iters:8d} | consumed samples: "
            f"{at.consumed_samples:10d} | consumed tokens: {at.consumed_tokens:12d} | elapsed time per iteration "
            f"(ms): {ms:.1f} | learning rate: {m['lr']:.3E} | lm loss: {m['lm_loss']:.6E} | grad norm: "
            f"{m['grad_norm']:.3f} | loss scale: {m['loss_scale']:.1f} | tokens/s: {tok_s:.0f} | "
            f"TFLOP/s/device: {flops / 1e12:.3f}")
    if peak_flops:
        mfu = 100.0 * flops / peak_flops
        line += f" | MFU: {mfu:.1f}%"
        if mfu > 100.0:  # a --peak-flops below what the device does; the figure is not a utilisation
            line += " (above 100%: the peak is too low, check --peak-flops)"
    if cfg.data.rampup_batch_size is not None:
        line += f" | global batch size: {m['batch_size']}"
    if cfg.curriculum is not None:
        line += f" | curriculum seqlen: {m['seqlen']}"
    if cfg.logging.wall_clock_breakdown and m.get("timers_ms"):
        line += " | " + " | ".join(f"{k} (ms): {v:.1f}" for k, v in m["timers_ms"].items())
    if m.get("kd_loss") is not None:
        line += f" | kd loss: {m['kd_loss']:.6E}"
    if m.get("skipped"):
        line += " | skipped (overflow)"
    if m.get("offload") is not None:
        line += "\n   " + m["offload"].summary()
    for i, s in enumerate(m.get("moe", [])):
        line += (f"\n   moe layer {i}: aux {s['aux_loss']:.4f} | tokens/expert min {s['tokens_min']:.0f} max "
                 f"{s['tokens_max']:.0f} cv {s['tokens_cv']:.3f} | dropped {100 * s['dropped']:.2f}%")
    return line


def write_tensorboard(writer, cfg: TrainConfig, at: Progress, m: dict, tok_s: Optional[float] = None,
                      iter_ms: Optional[float] = None) -> None:
    """The iteration's scalars at `at` (a SummaryWriter `writer`; None: nothing)."""
    if writer is None:
        return
    w, it, lg = writer, at.iteration, cfg.logging
    if lg.log_batch_size_to_tensorboard:
        w.add_scalar("batch-size", m["batch_size"], it)
        w.add_scalar("batch-size vs samples", m["batch_size"], at.consumed_samples)
    if lg.log_timers_to_tensorboard:
        if iter_ms is not None:
            w.add_scalar("iteration-time", iter_ms, it)
        for k, v in m.get("timers_ms", {}).items():
            w.add_scalar(f"timers/{k}-time", v, it)
    if cfg.curriculum is not None:
        w.add_scalar("seqlen/curriculum_seqlen", m["seqlen"], it)
    w.add_scalar("lm-loss", m["lm_loss"], it)
    w.add_scalar("lm-loss vs tokens", m["lm_loss"], at.consumed_tokens)
    w.add_scalar("learning-rate", m["lr"], it)
    if not math.isnan(m["grad_norm"]):
        w.add_scalar("grad-norm", m["grad_norm"], it)
    w.add_scalar("loss-scale", m["loss_scale"], it)
    if m.get("kd_loss") is not None:
        w.add_scalar("kd-loss", m["kd_loss"], it)
    if tok_s:
        w.add_scalar("tokens-per-second", tok_s, it)
    for i, s in enumerate(m.get("moe", [])):
        for k, v in s.items():
            w.add_scalar(f"moe/layer{i}/{k}", v, it)


@torch.no_grad()
def write_optimizer_states(writer, iteration: int, model: torch.nn.Module, optimizer_state: dict) -> None:
    """--log-optimizer-states-to-tensorboard (Megatron-DeepSpeed): L2 and L1 norms and abs max of Adam's second
    moment (variance), its square root, the first moment (momentum) and the weights, over this rank's parameters
    (with tensor/expert parallelism: rank 0's shards); `optimizer_state` is keyed by parameter."""
    if writer is None:
        return
    stats = {k: [torch.zeros((), dtype=torch.float64) for _ in range(3)]
             for k in ("variance", "variance_sqrt", "momentum", "weight")}
    for p in model.parameters():
        state = optimizer_state.get(p, {})
        if "exp_avg_sq" not in state:
            continue
        for name, t in (("variance", state["exp_avg_sq"]), ("variance_sqrt", state["exp_avg_sq"].sqrt()),
                        ("momentum", state["exp_avg"]), ("weight", p)):
            t = t.detach().double().cpu()
            acc = stats[name]
            acc[0] += t.pow(2).sum()
            acc[1] += t.abs().sum()
            acc[2] = torch.maximum(acc[2], t.abs().max())
    for name, (sq, l1, mx) in stats.items():
        writer.add_scalar(f"optimizer/{name}_l2", float(sq.sqrt()), iteration)
        writer.add_scalar(f"optimizer/{name}_l1", float(l1), iteration)
        writer.add_scalar(f"optimizer/{name}_abs_max", float(mx), iteration)


def open_writer(cfg):
    if not cfg.logging.tensorboard_dir or not is_rank0():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=cfg.logging.tensorboard_dir, max_queue=cfg.logging.tensorboard_queue_size)
