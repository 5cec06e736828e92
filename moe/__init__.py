"""Mixture-of-Experts layers usable in any PyTorch model (DeepSpeed-MoE compatible `MoE`)."""
from moe.config import MoEConfig
from moe.deepspeed_compat import MoE
from moe.layer import MoELayer, MoEStats

__all__ = ["MoE", "MoELayer", "MoEConfig", "MoEStats"]
