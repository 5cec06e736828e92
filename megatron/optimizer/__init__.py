"""Optimizer construction (param groups, expert groups, ZeRO sharding), LR schedule, loss scaling and gradient
clipping."""
from megatron.optimizer.optimizer import build_optimizer, param_groups  # noqa: F401
from megatron.optimizer.scheduler import OptimizerParamScheduler  # noqa: F401
from megatron.optimizer.grad_scaler import ConstantLossScaler, DynamicLossScaler  # noqa: F401
from megatron.optimizer.clip_grads import clip_grad_norm  # noqa: F401
from megatron.optimizer.zero import ZeroOptimizer  # noqa: F401
