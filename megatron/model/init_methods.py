"""Megatron weight initialisers: normal(0, std) and the depth-scaled variant for output projections."""
import math

import torch


def init_method_normal(std: float):
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init_method_normal(std: float, num_layers: int):
    """std / sqrt(2 * num_layers): each layer adds two residual branches (GPT-2 / Megatron)."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))
