"""Optimizers behind one interface (base.MegatronOptimizer: reduce, prepare, clip, step, state) with AdamW, ZeRO
and expert-state offload implementations; the LR schedule; loss scaling; the global-norm clip."""
from megatron.optimizer.optimizer import build_optimizer  # noqa: F401
from megatron.optimizer.adamw import param_groups  # noqa: F401
from megatron.optimizer.base import MegatronOptimizer, StepResult  # noqa: F401
from megatron.optimizer.scheduler import OptimizerParamScheduler  # noqa: F401
from megatron.optimizer.grad_scaler import ConstantLossScaler, DynamicLossScaler  # noqa: F401
from megatron.optimizer.clip_grads import clip_grad_norm, global_grad_norm  # noqa: F401
