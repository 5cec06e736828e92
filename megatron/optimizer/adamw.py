"""AdamW with Megatron's parameter groups (no weight decay on biases and norms, experts in their own groups), and
the plain data-parallel MegatronOptimizer over it."""
from typing import List

import torch

from megatron.config import OptimizerConfig
from megatron.optimizer.base import MegatronOptimizer
from moe.experts import is_expert_param


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Four groups (dense/expert x decay/no-decay); empty ones are dropped.

    Biases and 1-D parameters (LayerNorm) get no weight decay, as in Megatron. Expert groups are tagged
    `moe=True` (DeepSpeed's convention) so reductions and checkpoints can tell them apart.
    """
    groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (name.endswith(".bias") or p.dim() == 1)
        groups[(is_expert_param(p), decay)].append(p)
    out = []
    for (expert, decay), params in groups.items():
        if params:
            out.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "moe": expert,
                        "name": ("expert" if expert else "dense") + ("_decay" if decay else "_no_decay")})
    return out


def kernel(param: torch.Tensor) -> dict:
    """AdamW's fused kernel where the device supports it (CUDA, and CPU in recent torch), else foreach; probed on a
    stand-in parameter of `param`'s dtype and device."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, dtype=param.dtype, device=param.device))], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


def hyper(cfg: OptimizerConfig) -> dict:
    """torch.optim.AdamW's lr, betas and eps from the flags."""
    return dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def adamw(groups: List[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch AdamW over `groups` with the kernel `kernel` picks for their first parameter."""
    return torch.optim.AdamW(groups, **kernel(groups[0]["params"][0]), **hyper(cfg))


class AdamWOptimizer(MegatronOptimizer):
    """Plain data parallelism: every rank holds whole gradients and the whole Adam state; the base class's phases
    (all-reduce over DP / expert-DP, unscale, global-norm clip, torch AdamW) as they are."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, groups=None):
        super().__init__(adamw(param_groups(model, cfg.weight_decay), cfg), model, cfg, groups)
