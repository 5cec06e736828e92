"""Aggregations of per-example metric values and their standard errors, as lm-evaluation-harness reports them."""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import numpy as np


def mean(values: Sequence[float]) -> float:
    return float(math.fsum(values) / len(values))


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard error of the mean: sample std (n - 1) / sqrt(n); for 0/1 accuracy, sqrt(p(1-p)/(n-1))."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(math.fsum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def perplexity(logliks: Sequence[float]) -> float:
    """exp(mean over examples of the negative summed log-likelihood): the harness's LAMBADA perplexity."""
    return math.exp(-mean(logliks))


def perplexity_stderr(logliks: Sequence[float], iters: int = 10000, seed: int = 1234) -> float:
    """Bootstrap standard error of `perplexity`, the harness's method for this metric.

    Resample the examples with replacement `iters` times, take the perplexity of each resample, report their
    sample standard deviation. The harness does the same with 100000 resamples of Python's RNG, so its value
    differs from ours only by resampling noise (about 1% of the stderr at 10000 resamples).
    """
    n = len(logliks)
    if n < 2 or iters < 2:
        return float("nan")
    nll = -np.asarray(logliks, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty(iters)
    chunk = max(1, (1 << 22) // n)  # resamples per step, bounding memory at ~32 MiB of indices
    for start in range(0, iters, chunk):
        k = min(chunk, iters - start)
        idx = rng.integers(0, n, size=(k, n))
        out[start:start + k] = np.exp(nll[idx].mean(axis=1))
    return float(out.std(ddof=1))


# name -> (aggregate, stderr); a task names one of these per metric.
AGGREGATIONS: Dict[str, Tuple[Callable[[Sequence[float]], float], Callable[[Sequence[float]], float]]] = {
    "mean": (mean, mean_stderr),
    "perplexity": (perplexity, perplexity_stderr),
}
