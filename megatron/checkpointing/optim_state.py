"""The optimizer's side of a checkpoint, in one place, through the optimizer interface
(megatron.optimizer.MegatronOptimizer: AdamW, ZeRO and expert offload behind one set of methods).

The checkpoint layout is the unsharded AdamW's: per-parameter {"step", "exp_avg", "exp_avg_sq"} keyed by parameter
name, whatever optimizer (plain, ZeRO, expert offload) holds it. A bare torch optimizer (tools and tests that build
one directly) is read as the plain AdamW it is.
"""
from __future__ import annotations

from typing import Dict

import torch


def _interface(optimizer) -> bool:
    return hasattr(optimizer, "checkpoint_state")


def settle(optimizer) -> None:
    """Waits for an offloaded expert step still running behind the training thread, before its state is read."""
    if _interface(optimizer):
        optimizer.synchronize()


def gathered_state(model: torch.nn.Module, optimizer) -> Dict[str, dict]:
    """Adam state keyed by parameter name (index-free, so it survives resharding), as live tensors (no copies).

    A ZeRO optimizer's shards are gathered to the rank that writes them (group rank 0 of each bucket's group), into
    CPU memory; other ranks get no entry for those parameters. Collective under ZeRO: every rank calls this."""
    if _interface(optimizer):
        return optimizer.checkpoint_state()
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if st:
            out[name] = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in st.items()}
    return out


def register_step_pre_hook(optimizer, hook) -> bool:
    """Calls hook() before every step that changes parameters or state (torch.optim's step pre-hooks on the torch
    optimizer that does the update: ZeRO's inner AdamW updates the shards the parameters alias). False when there is
    none."""
    inner = getattr(optimizer, "optimizer", optimizer) if _interface(optimizer) else optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        return False
    inner.register_step_pre_hook(lambda *_: hook())
    return True


def offloaded_expert_state(optimizer, moe_layer: int, expert_id: int) -> dict:
    """{parameter short name: Adam state} of one expert whose state lives in an offload store; {} otherwise."""
    return optimizer.expert_state(moe_layer, expert_id) if _interface(optimizer) else {}


def expert_state_offloaded(optimizer) -> bool:
    """Whether the experts' Adam state lives in an offload store (loaded one expert at a time, never stacked)."""
    return bool(getattr(optimizer, "offloads_expert_state", False))


def load_state(optimizer, by_param: Dict[torch.nn.Parameter, dict], where: str) -> None:
    """Installs per-parameter Adam state (unsharded layout): a ZeRO optimizer keeps the slice each rank owns."""
    if _interface(optimizer):
        optimizer.load_param_state(by_param, where)
    else:
        optimizer.state.update(by_param)


def load_offloaded_expert_state(optimizer, moe_layer: int, expert_id: int, state: dict) -> None:
    optimizer.load_expert_state(moe_layer, expert_id, state)
