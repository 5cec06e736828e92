"""Global batch size per step under Megatron's --rampup-batch-size, and the iteration count it implies."""
from __future__ import annotations

from megatron.config import DataConfig


def global_batch_size_at(consumed_samples: int, data: DataConfig) -> int:
    """The global batch (samples, all ranks) of the step that starts after `consumed_samples` samples.

    Megatron's RampupBatchsizeNumMicroBatches: from START the batch grows by INC every
    SAMPLES / ((GBS - START) / INC) samples, and is GBS once more than SAMPLES samples were consumed:
        gbs(c) = GBS                                         if c > SAMPLES
                 START + INC * floor(c / (SAMPLES / n_inc))  otherwise, n_inc = (GBS - START) / INC
    Without a ramp-up it is --global-batch-size.
    """
    gbs = data.global_batch_size
    if data.rampup_batch_size is None:
        return gbs
    start, inc, ramp_samples = data.rampup_batch_size
    if consumed_samples > ramp_samples or start == gbs:
        return gbs
    per_increment = ramp_samples / ((gbs - start) // inc)
    return start + int(consumed_samples / per_increment) * inc


def train_iters_from_samples(train_samples: int, data: DataConfig) -> int:
    """Megatron's update_train_iters: iterations of sample-based training (the ramp-up steps, then whole global
    batches; a partial last batch is dropped)."""
    gbs = data.global_batch_size
    if data.rampup_batch_size is None:
        return train_samples // gbs
    iterations, consumed = 0, 0
    while consumed <= data.rampup_batch_size[2]:
        consumed += global_batch_size_at(consumed, data)
        iterations += 1
    return iterations + (train_samples - consumed) // gbs


def rampup_batch_sizes(data: DataConfig):
    """Every global batch size the ramp-up passes through (for up-front divisibility checks)."""
    if data.rampup_batch_size is None:
        return [data.global_batch_size]
    start, inc, _ = data.rampup_batch_size
    return list(range(start, data.global_batch_size + 1, inc))
