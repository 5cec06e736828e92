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


def _kernel(param: torch.Tensor) -> dict:
    """AdamW's fused kernel where the device supports it (CUDA, and CPU in recent torch), else foreach; probed on a
    stand-in parameter of `param`'s dtype and device."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, dtype=param.dtype, device=param.device))], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


def _hyper(cfg: OptimizerConfig) -> dict:
    return dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def adamw(groups: List[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch AdamW over `groups` with the kernel `_kernel` picks for their first parameter."""
    return torch.optim.AdamW(groups, **_kernel(groups[0]["params"][0]), **_hyper(cfg))


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, groups=None, zero_stage: int = 0, offload=None,
                    rank: int = 0, world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW over Megatron's param groups.

    With zero_stage 1 or 2: megatron/optimizer/zero.py's ZeroOptimizer (state sharded over data-parallel ranks;
    `groups` are the ParallelGroups it shards over). With `offload` (a moe.offload.OptimizerOffloadConfig in nvme
    mode): the expert parameters' Adam state lives in files (megatron.optimizer.offload.ExpertOffloadAdamW, same
    update bit for bit); `rank`/`world_size` name this process's store. The two do not combine (arguments.validate).
    """
    if zero_stage:
        from megatron.optimizer.zero import ZeroOptimizer

        return ZeroOptimizer(model, cfg, groups, zero_stage)
    if offload is None or not offload.enabled:
        return adamw(param_groups(model, cfg.weight_decay), cfg)
    from megatron.optimizer.offload import ExpertOffloadAdamW

    # the kernel adamw() would pick (probed, not tried: building the offloaded optimizer opens its store)
    return ExpertOffloadAdamW(param_groups(model, cfg.weight_decay), model=model, offload=offload, rank=rank,
                              world_size=world_size, **_kernel(next(model.parameters())), **_hyper(cfg))
