"""When training must stop: --exit-interval, --exit-signal-handler, --exit-duration-in-mins (agreed by all ranks),
and a non-finite step in bf16/fp32 (--check-for-nan-in-loss-and-grad)."""
from __future__ import annotations

import signal
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.config import LoggingConfig
from megatron.errors import TrainingError


class ExitSignals:
    """--exit-signal-handler: SIGTERM/SIGINT are recorded, not acted on, so the step in progress finishes and the
    loop saves and exits 0 at the next step boundary (Megatron-LM's DistributedSignalHandler)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self.previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}

    def _record(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def exit_reason(lg: LoggingConfig, iteration: int, signals: Optional[ExitSignals], start: float,
                device: torch.device) -> Optional[str]:
    """Why the loop stops after `iteration` (None: it goes on); `start` is the run's time.time() at start. Every
    rank gets the same answer: the signal and the wall-clock budget are agreed by an all-reduce (MAX) on `device`,
    as a signal may reach one rank only."""
    if lg.exit_interval and iteration % lg.exit_interval == 0:
        return f"--exit-interval {lg.exit_interval}"
    if signals is None and lg.exit_duration_in_mins is None:
        return None
    flags = torch.tensor([float(signals is not None and signals.received is not None),
                          float(lg.exit_duration_in_mins is not None
                                and (time.time() - start) / 60.0 > lg.exit_duration_in_mins)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0] > 0:
        name = signal.Signals(signals.received).name if signals is not None and signals.received else "a signal"
        return f"--exit-signal-handler: {name} received"
    if flags[1] > 0:
        return f"--exit-duration-in-mins {lg.exit_duration_in_mins}"
    return None


class NonFiniteError(TrainingError):
    """bf16/fp32 training produced a NaN/Inf loss or gradient (--check-for-nan-in-loss-and-grad)."""


def describe_non_finite(iteration: int, rank: int, lm_sum: torch.Tensor, moe_logs: List[List],
                        grad_norm: float) -> str:
    """One line: the step after `iteration` and the rank, and where the NaN/Inf showed first on this rank (MoE
    router, lm loss)."""
    where = f"iteration {iteration + 1}, rank {rank}"
    for layer in range(len(moe_logs[0]) if moe_logs else 0):
        if not all(bool(torch.isfinite(m[layer].aux_loss)) for m in moe_logs):
            return (f"{where}: MoE layer {layer}'s router produced a non-finite aux loss (gradient norm "
                    f"{grad_norm}); stopped before the optimizer step, nothing saved. Lower --lr or check the data "
                    f"(--no-check-for-nan-in-loss-and-grad disables this check)")
    what = "lm loss is " + str(float(lm_sum)) if not bool(torch.isfinite(lm_sum)) else "gradient norm is " + str(grad_norm)
    return (f"{where}: the {what}; stopped before the optimizer step, nothing saved. Lower --lr or check the "
            f"data (--no-check-for-nan-in-loss-and-grad disables this check)")
