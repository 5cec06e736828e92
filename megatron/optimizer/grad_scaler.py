"""fp16 loss scaling: a dynamic scaler that skips overflow steps (Megatron semantics) and a constant one."""
import torch


class ConstantLossScaler:
    def __init__(self, scale: float):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])


class DynamicLossScaler:
    """Halve on overflow (after `hysteresis` overflows), double after `growth_interval` clean steps."""

    def __init__(self, initial_scale: float, min_scale: float = 1.0, growth_interval: int = 1000,
                 hysteresis: int = 2, growth_factor: float = 2.0, backoff_factor: float = 0.5):
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self._growth_tracker = 0
        self._hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self._growth_tracker = int(sd["growth_tracker"])
        self._hysteresis_tracker = int(sd["hysteresis_tracker"])


def unscale_and_check(params, scale: float) -> bool:
    """Divides grads by `scale` in place; returns True if any grad is inf/nan (one fused check per device)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return False
    found = torch.zeros(1, device=grads[0].device)
    inv = torch.full((1,), 1.0 / scale, device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
    return bool(found.item())
