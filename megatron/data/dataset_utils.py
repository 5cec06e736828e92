"""``build_train_valid_test_datasets``: from ``--data-path``/``--split``/sample counts to the three (blended) datasets."""

import logging
import math
from typing import Callable, List, Optional, Sequence, Tuple

from megatron.data.blendable_dataset import BlendableDataset, parse_data_path
from megatron.data.gpt_dataset import build_gpt_datasets_for_prefix

logger = logging.getLogger(__name__)

# Each blended dataset gets this much more than its share, so the greedy blend (which can run one
# sample ahead of w * n) never asks a dataset for a sample past its end. Megatron's factor.
_BLEND_OVERSAMPLE = 1.005


def build_train_valid_test_datasets(
    data_prefix: Sequence[str],
    splits_string: str,
    train_valid_test_num_samples: Tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_dir: Optional[str] = None,
    barrier: Optional[Callable[[], None]] = None,
    rank: int = 0,
    vocab_size: Optional[int] = None,
):
    """Build the train, valid and test datasets.

    Args:
        data_prefix: ``--data-path`` as a list: one prefix, or ``WEIGHT PREFIX`` pairs to blend.
        splits_string: ``--split``, e.g. ``"969,30,1"``; applied to each prefix's documents.
        train_valid_test_num_samples: samples each split must provide (train iters x global batch, ...).
        seq_length: ``--seq-length``.
        seed: ``--seed``.
        cache_dir: ``--data-cache-path`` for the index ``.npy`` files (default beside each prefix).
        barrier: callable run by all ranks after rank 0 built the caches (e.g. a torch.distributed barrier).
        rank: global rank; only rank 0 builds caches.
        vocab_size: the tokenizer's vocabulary size; a token id outside [0, vocab_size) is a DataError naming the
            file (each split's range scanned at every start, and every sample as it is read).

    Returns:
        (train, valid, test): GPTDataset, BlendableDataset, or None where the split is empty or no
        samples are asked for. Each item is ``{"text": int64[seq_length + 1]}``.
    """
    prefixes, weights = parse_data_path(data_prefix)
    if len(prefixes) == 1:
        train, valid, test = build_gpt_datasets_for_prefix(
            prefixes[0], splits_string, train_valid_test_num_samples, seq_length, seed, cache_dir, barrier, rank,
            vocab_size)
        return train, valid, test

    per_prefix: List[List] = []
    for prefix, weight in zip(prefixes, weights):
        counts = [int(math.ceil(n * weight * _BLEND_OVERSAMPLE)) for n in train_valid_test_num_samples]
        per_prefix.append(build_gpt_datasets_for_prefix(prefix, splits_string, counts, seq_length, seed, cache_dir, barrier, rank,
                                                        vocab_size))

    blended = []
    for split, size in enumerate(train_valid_test_num_samples):
        parts = [(ds[split], w) for ds, w in zip(per_prefix, weights) if ds[split] is not None and w > 0]
        if not parts or size <= 0:
            blended.append(None)
            continue
        if len(parts) < sum(1 for w in weights if w > 0):
            logger.warning("split %d: some --data-path prefixes have no documents in it; blending the others", split)
        blended.append(BlendableDataset([p[0] for p in parts], [p[1] for p in parts], size))
    return tuple(blended)
