"""RNG for dropout on tensor-parallel (sharded) activations, as Megatron's model-parallel RNG tracker.

Dropout on replicated activations uses the default generator, seeded alike on every rank so the replicas stay
identical. Dropout on sharded activations (attention probabilities of this rank's heads) must differ between
tensor-parallel ranks, so it runs inside `fork(device)`, which swaps in a generator state seeded with
seed + 2718 + tp_rank and swaps the default one back afterwards. Its state goes into checkpoints (`state_dict`)
for exact resume.
"""
import contextlib
from typing import Dict

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

    def state_dict(self) -> dict:
        return {"seed": self.seed, "states": {k: v.clone() for k, v in self._states.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.seed = int(sd["seed"])
        self._states = {k: v.clone() for k, v in sd["states"].items()}
