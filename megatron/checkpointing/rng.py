"""The RNG streams a checkpoint records and restores: Python, NumPy, torch CPU/CUDA, and the model's per-TP-rank
dropout stream (megatron/tensor_parallel/random.py)."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch


def get_rng_state(model: Optional[torch.nn.Module] = None) -> dict:
    """Every global generator's state, plus `model.rng_tracker`'s (as "tensor_parallel") when the model has one."""
    st = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    st = _to_plain(st)
    tracker = getattr(model, "rng_tracker", None)
    if tracker is not None:
        st["tensor_parallel"] = tracker.state_dict()
    return st


def set_rng_state(st: dict) -> None:
    """The global generators only (see restore_rng for the model's tensor-parallel stream too)."""
    r = st["random"]
    random.setstate((r[0], tuple(r[1]), r[2]))
    n = st["np"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def restore_rng(st: dict, model: Optional[torch.nn.Module] = None) -> None:
    """Restores what get_rng_state(model) recorded: the global generators and, when both the checkpoint and the model
    have one, the model's tensor-parallel dropout stream. The one restore for every load path (resume and
    --reset-iteration alike)."""
    set_rng_state(st)
    tracker = getattr(model, "rng_tracker", None)
    if tracker is not None and st.get("tensor_parallel"):
        tracker.load_state_dict(st["tensor_parallel"])


def _to_plain(obj):
    """Turns numpy/tuple state into types torch.load(weights_only=True) accepts."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
