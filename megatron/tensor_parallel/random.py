"""RNG for dropout on tensor-parallel (sharded) activations, as Megatron's model-parallel RNG tracker.

Dropout on replicated activations uses the default generator, seeded alike on every rank so the replicas stay
identical. Dropout on sharded activations (attention probabilities of this rank's heads) must differ between
tensor-parallel ranks, so it runs inside `fork(device)`, which swaps in a generator state seeded with
seed + 2718 + tp_rank and swaps the default one back afterwards. Its state goes into checkpoints (`state_dict`)
for exact resume.

`checkpoint` is activation recomputation that replays both streams: torch.utils.checkpoint restores the default
generators for the recompute, and the tracker's own state is restored here alongside (Megatron's CheckpointFunction
does the same with its CUDA RNG tracker), so dropout draws the same masks in the recompute.
"""
import contextlib
import functools
from typing import Callable, Dict, Optional

import torch

_OFFSET = 2718  # Megatron's model-parallel seed offset


def _get(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class TensorParallelRNGTracker:
    def __init__(self, seed: int, tp_rank: int):
        self.seed = seed + _OFFSET + tp_rank
        self._states: Dict[str, torch.Tensor] = {}  # per device type, created on first use

    def _initial_state(self, device: torch.device) -> torch.Tensor:
        # a private Generator: torch.manual_seed would reseed every device's default generator
        return torch.Generator(device=device).manual_seed(self.seed).get_state()

    @contextlib.contextmanager
    def fork(self, device: torch.device):
        device = torch.device(device)
        key = device.type
        if key not in self._states:
            self._states[key] = self._initial_state(device)
        saved = _get(device)
        _set(device, self._states[key])
        try:
            yield
        finally:
            self._states[key] = _get(device)
            _set(device, saved)

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of the per-device-type generator states (an absent key: not used yet, starts from the seed)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "states": {k: v.clone() for k, v in self._states.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.seed = int(sd["seed"])
        self._states = {k: v.clone() for k, v in sd["states"].items()}


def checkpoint(function: Callable, rng_tracker: Optional[TensorParallelRNGTracker], *args):
    """function(*args) under torch.utils.checkpoint (non-reentrant): activations inside are freed after the forward
    and recomputed in the backward, with the same dropout masks from both the default generators (torch restores
    them) and `rng_tracker` (restored by the recompute context below; None: no tracker).

    early_stop=False: the recompute always runs `function` to its end, so every collective inside it (TP
    all-reduces, the MoE all-to-alls) runs on every rank of its group whatever tensors a rank still needs.
    """
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, early_stop=False,
                                             context_fn=functools.partial(_tracker_contexts, rng_tracker))


def _tracker_contexts(tracker: Optional[TensorParallelRNGTracker]):
    """(forward context, recompute context): the recompute starts from the tracker state the forward started from
    and leaves the tracker where the forward had left it."""
    if tracker is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    at_forward = tracker.get_states()  # called by torch when the checkpointed forward starts

    @contextlib.contextmanager
    def recompute():
        after_forward = tracker.get_states()
        tracker.set_states(at_forward)
        try:
            yield
        finally:
            tracker.set_states(after_forward)

    return contextlib.nullcontext(), recompute()
