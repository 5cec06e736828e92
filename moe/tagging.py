"""Expert-parallel tags on parameters: which parameters belong to experts (reduced over expert-DP, saved per expert)."""
from __future__ import annotations

import torch
from torch import nn


def is_expert_param(p: torch.Tensor) -> bool:
    """True for parameters owned by expert-parallel ranks (reduced over expert-DP, saved per expert)."""
    return bool(getattr(p, "expert_parallel", False))


def tag_stacked(p: nn.Parameter, num_local_experts: int) -> None:
    """Tag a stacked expert parameter (dim 0 = local expert)."""
    p.expert_parallel = True
    p.num_local_experts = num_local_experts


def tag_module_expert(module: nn.Module, local_expert_index: int, num_local_experts: int) -> None:
    """Tag every parameter of one user expert module (ModuleExperts' copy `local_expert_index`)."""
    for p in module.parameters():
        p.expert_parallel = True
        p.local_expert_index = local_expert_index
        p.num_local_experts = num_local_experts
