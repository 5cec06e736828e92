"""Weighted blending of several datasets (``--data-path 0.7 A 0.3 B``) with Megatron's greedy index assignment."""

import logging
import math
from typing import List, Sequence, Tuple, Union

import numpy as np

from megatron.errors import ConfigError

logger = logging.getLogger(__name__)


def parse_data_path(data_path: Union[str, Sequence[str]]) -> Tuple[List[str], List[float]]:
    """Split ``--data-path`` into prefixes and normalised weights.

    ``["A"]`` -> (["A"], [1.0]); ``["0.7", "A", "0.3", "B"]`` -> (["A", "B"], [0.7, 0.3]).
    Raises ValueError naming --data-path for an odd-length list, a non-numeric or negative weight,
    or weights summing to zero.
    """
    items = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not items:
        raise ConfigError("--data-path is empty; give a prefix or weight/prefix pairs")
    if len(items) == 1:
        return [items[0]], [1.0]
    if len(items) % 2:
        raise ConfigError(f"--data-path {' '.join(items)}: expected one prefix or 'WEIGHT PREFIX' pairs, got {len(items)} items")
    prefixes, weights = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(f"--data-path weight {w!r} (before {p!r}) is not a number") from None
        if weight < 0 or not math.isfinite(weight):
            raise ConfigError(f"--data-path weight {w} for {p} must be a finite number >= 0")
        prefixes.append(p.strip())
        weights.append(weight)
    total = sum(weights)
    if total <= 0:
        raise ConfigError(f"--data-path weights {weights} sum to zero")
    return prefixes, [w / total for w in weights]


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending (``helpers.cpp: build_blending_indices``).

    Sample i goes to the dataset furthest behind its target, ``argmax_d(w_d * max(i, 1) - count_d)``
    (ties to the lowest index), so after n samples every count is within one sample of ``w_d * n``.

    Returns:
        dataset_index uint8[size] and dataset_sample_index int64[size] (the k-th pick of a dataset
        reads its sample k).
    """
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    if n > 255:
        raise ConfigError(f"--data-path names {n} datasets; blending supports at most 255")
    dataset_index = np.empty(size, dtype=np.uint8)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    counts = [0] * n
    wl = w.tolist()
    rng_d = range(n)
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best, best_err = 0, wl[0] * x - counts[0]
        for d in rng_d:
            err = wl[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


class BlendableDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``; item i is the chosen dataset's item."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"BlendableDataset: {len(datasets)} datasets but {len(weights)} weights")
        total = float(sum(weights))
        if total <= 0:
            raise ValueError(f"--data-path weights {list(weights)} sum to zero")
        self.datasets = list(datasets)
        self.weights = [float(w) / total for w in weights]
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, self.size)
        for d, ds in enumerate(self.datasets):
            picked = self.dataset_sample_index[self.dataset_index == d]
            if len(picked) and picked.max() >= len(ds):
                raise ValueError(f"blended dataset {d} has {len(ds)} samples but the blend needs {picked.max() + 1}")
        logger.info("blended %d datasets, %d samples, weights %s", len(self.datasets), self.size, self.weights)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]
