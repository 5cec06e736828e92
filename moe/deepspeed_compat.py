"""DeepSpeed compatibility: `MoE`, a drop-in for deepspeed.moe.layer.MoE (constructor, call, return, routing and
state_dict loading), built on `MoELayer`; and DeepSpeed's default expert-parallel groups."""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.config import MoEConfig
from moe.experts import GroupedMLPExperts
from moe.layer import MoELayer

_DEFAULT_EP_GROUPS: Dict[int, object] = {}  # ep_size -> this rank's group, built once per process


def _default_ep_group(ep_size: int):
    """Groups of consecutive ranks of size ep_size (DeepSpeed's default layout), built collectively once."""
    if ep_size == 1:
        return None
    if ep_size not in _DEFAULT_EP_GROUPS:
        if not dist.is_initialized():
            raise ValueError(f"ep_size={ep_size} needs torch.distributed to be initialised (or pass ep_group)")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % ep_size != 0:
            raise ValueError(f"--moe-expert-parallel-size ({ep_size}) must divide the world size ({world})")
        for start in range(0, world, ep_size):
            group = dist.new_group(list(range(start, start + ep_size)))
            if start <= rank < start + ep_size:
                _DEFAULT_EP_GROUPS[ep_size] = group
    return _DEFAULT_EP_GROUPS[ep_size]


class MoE(nn.Module):
    """Drop-in for deepspeed.moe.layer.MoE: same constructor arguments and defaults, call and return, and the same
    routing (deepspeed/moe/sharded_moe.py: top-1 RTS in training and eval, top-2 Gumbel second-expert sampling,
    every first choice kept before any second, gates renormalised after dropping, top-k aux loss over all k), so
    with the same weights and torch RNG state it returns what DeepSpeed returns (tests/unit/test_deepspeed_parity.py).

    forward(hidden_states [..., D]) -> (output [..., D], l_aux (fp32 scalar, unscaled), exp_counts [E] int64).
    expert=None builds MLP experts (moe.experts.MLP's function, tanh GELU, width ffn_hidden_size, default
    4*hidden_size) as stacked weights; a user `expert` module is deep-copied per local expert. ep_group=None with
    ep_size > 1 builds groups of consecutive ranks, like DeepSpeed. use_residual=True is Residual-MoE (ResidualMix):
    a dense copy of `expert` (or an MLP of width ffn_hidden_size) mixed in per token.
    use_tutel is accepted and ignored (one warning). enable_expert_tensor_parallelism=True splits each built-in
    expert's FFN over `tp_group` (DeepSpeed takes it from its mpu: the model's TP group, whose ranks hold the same
    tokens): expert tensor parallelism with ETP = TP; each TP rank dispatches 1/TP of the tokens and the outputs are
    all-gathered (MoELayer.forward_folded); with ep_size > 1 pass ep_group too (the ranks with this TP rank, one per
    EP slot, as DeepSpeed's expert groups under an mpu). Beyond DeepSpeed: ffn_hidden_size, ep_group, tp_group, and
    `cfg` (a MoEConfig, which then replaces the routing arguments) for this project's other routing choices.
    """

    _warned_tutel = False

    def __init__(self, hidden_size: int, expert: Optional[nn.Module] = None, num_experts: int = 1,
                 ep_size: int = 1, k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, use_residual: bool = False, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False, top2_2nd_expert_sampling: bool = True,
                 ffn_hidden_size: Optional[int] = None, ep_group=None, cfg: Optional[MoEConfig] = None,
                 tp_group=None):
        super().__init__()
        folded = {}
        if enable_expert_tensor_parallelism:
            if tp_group is None or (ep_size > 1 and ep_group is None):
                raise ValueError("enable_expert_tensor_parallelism=True needs tp_group= (the model's tensor-parallel "
                                 "group, DeepSpeed's mpu) and, with ep_size > 1, ep_group= (the ranks of this TP "
                                 "rank, one per EP slot); pass them or enable_expert_tensor_parallelism=False")
            folded = {"etp_group": tp_group, "dedup_group": tp_group}
        if use_tutel and not MoE._warned_tutel:
            MoE._warned_tutel = True
            logging.getLogger(__name__).warning("use_tutel=True is ignored: this MoE dispatches by sorting tokens "
                                                "(no Tutel kernels needed)")
        if cfg is None:
            cfg = MoEConfig(num_experts=num_experts, topk=k, ep_size=ep_size, train_capacity_factor=capacity_factor,
                            eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                            drop_tokens=drop_tokens, noisy_gate_policy=noisy_gate_policy, use_rts=use_rts,
                            mlp_type="residual" if use_residual else "standard",
                            second_expert_sampling=top2_2nd_expert_sampling)
        if ep_group is None:
            ep_group = _default_ep_group(ep_size)
        self.num_experts, self.ep_size, self.use_residual = num_experts, ep_size, use_residual
        self.moe = MoELayer(hidden_size, ffn_hidden_size or 4 * hidden_size, num_experts, cfg,
                            ep_group=ep_group, expert=expert, **folded)

    def load_deepspeed_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        """Loads a deepspeed.moe.layer.MoE state_dict (this rank's): gate.wg -> router, deepspeed_experts.{i} ->
        local expert i (into the stacked weights when built-in: the DeepSpeed expert must then be an MLP whose
        parameters are, in order, [F, D] and [F] then [D, F] and [D]), mlp/coefficient -> the residual branch."""
        own: Dict[str, torch.Tensor] = {"moe.router.weight": sd["deepspeed_moe.gate.wg.weight"]}
        prefix = "deepspeed_moe.experts.deepspeed_experts."
        stacked = isinstance(self.moe.experts, GroupedMLPExperts)
        per_expert: Dict[int, list] = {}
        for key, value in sd.items():
            if key.startswith(prefix):
                i, rest = key[len(prefix):].split(".", 1)
                if stacked:
                    per_expert.setdefault(int(i), []).append(value)
                else:
                    own[f"moe.experts.experts.{i}.{rest}"] = value
            elif key.startswith("coefficient."):
                own[f"moe.residual.{key}"] = value
        mlp_sd = [v for k, v in sd.items() if k.startswith("mlp.")]
        if mlp_sd:  # the residual branch, parameter by parameter in order (DeepSpeed's is the user `expert`)
            names = list(self.moe.residual.mlp.state_dict())
            if [tuple(v.shape) for v in mlp_sd] != [tuple(v.shape) for v in self.moe.residual.mlp.state_dict().values()]:
                raise ValueError("DeepSpeed's residual MLP does not match this MoE's; build it with the same `expert`")
            own.update({f"moe.residual.mlp.{n}": v for n, v in zip(names, mlp_sd)})
        for i, tensors in per_expert.items():
            if [tuple(t.shape) for t in tensors] != [tuple(p[i].shape) for p in (
                    self.moe.experts.w1_eFD, self.moe.experts.b1_eF, self.moe.experts.w2_eDF, self.moe.experts.b2_eD)]:
                raise ValueError(f"DeepSpeed expert {i} is not a D -> F -> D MLP with biases; build this MoE with "
                                 f"the same `expert` module instead")
            for name, t in zip(("w1_eFD", "b1_eF", "w2_eDF", "b2_eD"), tensors):
                own.setdefault(f"moe.experts.{name}", getattr(self.moe.experts, name).detach().clone())[i] = t
        self.load_state_dict(own, strict=True)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's hook for building its expert groups; a no-op here (the groups exist from construction)."""

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if used_token is not None:
            raise NotImplementedError("MoE.forward(used_token=...) is not supported: drop the unused tokens before "
                                      "the call (DeepSpeed honours it for top-1 only)")
        output, stats = self.moe(hidden_states)
        return output, stats.aux_loss, stats.tokens_per_expert
