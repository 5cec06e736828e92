"""Resumable pretraining batch sampler and the DataLoader built on it."""

import functools
import os
import signal
import threading
from typing import Dict, Iterable, Iterator, List, Sequence

import numpy as np
import torch

from megatron.errors import DataError


class MegatronPretrainingSampler:
    """Yields this data-parallel rank's micro-batch indices, in order, from ``consumed_samples`` on.

    The dataset is already shuffled, so sampling is sequential: global batch j (of
    ``micro_batch_size * data_parallel_size`` indices) is ``consumed_samples + j*gb .. + gb``, and rank r
    takes its ``[r*mbs, (r+1)*mbs)`` slice. Resuming at any ``consumed_samples`` (checkpointed by the
    trainer) therefore continues exactly where the previous run stopped, no state needed.

    Args:
        total_samples: length of the dataset.
        consumed_samples: samples already used by all ranks together.
        micro_batch_size: samples per rank per micro-batch.
        data_parallel_rank, data_parallel_size: this rank's place in the DP group.
        drop_last: drop a final incomplete global batch (otherwise each rank gets its part of it,
            possibly short or empty).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise DataError(f"no samples to train on (dataset length {total_samples})")
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(f"consumed samples ({consumed_samples}) must be in [0, dataset length {total_samples}]")
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size ({micro_batch_size}) must be positive")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data parallel rank {data_parallel_rank} is not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.global_micro_batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_micro_batch)
        reaches_rank = rest > self.data_parallel_rank * self.micro_batch_size
        return full + (1 if reaches_rank and not self.drop_last else 0)

    def __iter__(self) -> Iterator[List[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for batch_start in range(self.consumed_samples, self.total_samples, self.global_micro_batch):
            batch_end = batch_start + self.global_micro_batch
            if batch_end > self.total_samples and self.drop_last:
                return
            lo = batch_start + start
            hi = min(lo + self.micro_batch_size, self.total_samples)
            if lo >= hi:  # a short last global batch may not reach this rank
                return
            yield list(range(lo, hi))


def collate_text(samples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    """Stack ``{"text": int64[s+1]}`` items into ``{"text": LongTensor[b, s+1]}``."""
    return {"text": torch.from_numpy(np.stack([s["text"] for s in samples]).astype(np.int64))}


def _ignore_stop_signals(main_pid: int, worker_id: int) -> None:
    """DataLoader worker init: a terminal's Ctrl-C (SIGINT), SLURM's preemption or time limit and `pkill -f` (SIGTERM)
    reach every process of the run, workers included; the main process alone decides (--exit-signal-handler finishes
    the step, saves and exits), so a worker killed by them must not end the run first.

    SIGTERM from the process that built the loader (``main_pid``) or from the worker's parent still ends it (the two
    differ under the forkserver start method, where the parent is the server, and when the loader was built before a
    fork): that is the loader's shutdown and multiprocessing's exit handler, which
    terminates the daemonic workers of an iterator still alive at interpreter exit and then joins them (a worker
    ignoring every SIGTERM hung that exit forever). The sender is only visible to ``sigwaitinfo``, so SIGTERM is
    blocked in the worker and one thread waits for it. A worker also exits when it sees its parent gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not Linux: keep the default SIGTERM (the worker dies with the run)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=({main_pid, os.getppid()},), daemon=True,
                     name="dataloader-worker-sigterm").start()


def _exit_on_sigterm_from(owners: set) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid in owners:
            os._exit(0)  # as the default action would, without the loader reporting a worker killed by a signal


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                                  dp_size: int, num_workers: int = 2, drop_last: bool = True):
    """DataLoader over ``dataset`` yielding ``{"text": LongTensor[micro_batch_size, s+1]}`` for this DP rank,
    resumed at ``consumed_samples``; None when ``dataset`` is None."""
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_text,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(_ignore_stop_signals, os.getpid()),
        # a private generator: creating an iterator must not draw from the global torch RNG, or dropout
        # after a resume would differ from an uninterrupted run
        generator=torch.Generator(),
    )


def user_errors_unwrapped(loader: Iterable) -> Iterator:
    """Iterates `loader`; a project error (megatron.errors.UserError, e.g. a corrupted data file) raised in a
    DataLoader worker, which torch re-raises with the worker's traceback folded into its message, is raised again
    as the one-line error it was."""
    return _unwrapped(iter(loader))  # iter() now: workers start here, as without the wrapper


def _unwrapped(it: Iterator) -> Iterator:
    from megatron.errors import UserError

    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UserError as e:
            text = str(e)
            if not (text.startswith("Caught ") and "Traceback" in text):
                raise
            last = text.rstrip().splitlines()[-1]  # "package.module.ErrorType: the message"
            raise type(e)(last.split(": ", 1)[1] if ": " in last else last) from None
        yield batch
