"""AdamW with Megatron's parameter groups: no weight decay on biases and norms, experts in their own groups."""
from typing import List

import torch

from megatron.config import OptimizerConfig
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


def adamw(groups: List[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch AdamW over `groups`; the fused kernel where the device supports it (CUDA, and CPU in recent torch)."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, groups=None, zero_stage: int = 0):
    """AdamW over Megatron's param groups; with zero_stage 1 or 2, megatron/optimizer/zero.py's ZeroOptimizer
    (state sharded over data-parallel ranks; `groups` are the ParallelGroups it shards over)."""
    if zero_stage:
        from megatron.optimizer.zero import ZeroOptimizer

        return ZeroOptimizer(model, cfg, groups, zero_stage)
    return adamw(param_groups(model, cfg.weight_decay), cfg)
