"""Mixture-of-Experts layers usable in any PyTorch model (DeepSpeed-MoE compatible `MoE`)."""
from moe.config import MoEConfig
from moe.layer import MoE, MoELayer, MoEStats

__all__ = ["MoE", "MoELayer", "MoEConfig", "MoEStats"]
