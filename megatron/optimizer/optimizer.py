"""build_optimizer: the one place that picks the MegatronOptimizer implementation from the flags."""
import torch

from megatron.config import OptimizerConfig
from megatron.optimizer.adamw import AdamWOptimizer
from megatron.optimizer.base import MegatronOptimizer
from megatron.optimizer.offload import OffloadAdamWOptimizer
from megatron.optimizer.zero import ZeroOptimizer


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, groups=None, zero_stage: int = 0, offload=None,
                    rank: int = 0, world_size: int = 1) -> MegatronOptimizer:
    """AdamW over Megatron's param groups, behind the MegatronOptimizer interface (megatron/optimizer/base.py).

    With zero_stage 1 or 2: ZeroOptimizer (state sharded over data-parallel ranks). With `offload` (a
    moe.offload.OptimizerOffloadConfig in nvme mode): OffloadAdamWOptimizer, the expert parameters' Adam state in
    files (same update bit for bit); `rank`/`world_size` name this process's store. The two do not combine
    (arguments.validate). `groups` (megatron.parallel_state.ParallelGroups) are the groups gradients are reduced
    and norms summed over; None: one process.
    """
    if zero_stage:
        return ZeroOptimizer(model, cfg, groups, zero_stage)
    if offload is not None and offload.enabled:
        return OffloadAdamWOptimizer(model, cfg, offload, groups, rank, world_size)
    return AdamWOptimizer(model, cfg, groups)
