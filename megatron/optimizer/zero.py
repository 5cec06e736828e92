"""ZeRO stages 1 and 2 (DeepSpeed; Megatron-LM's distributed optimizer): the AdamW state, and with stage 2 the
reduced gradients, sharded over data-parallel ranks; expert parameters over their expert-data-parallel group.

Layout. The parameters are split into buckets, one per (optimizer param group, process group): dense parameters
shard over the DP group, the experts of each EP size over that size's expert-DP group (the ranks holding the same
experts). A bucket's parameters become views of one flat fp32 buffer padded to a multiple of the group size W;
rank r owns the contiguous slice [r*S, (r+1)*S), S = ceil(numel / W). A torch AdamW (the same kernel as without
ZeRO, `build_optimizer`) steps only the owned slices, so each rank holds 1/W of the Adam state; after the step the
slices are all-gathered back into the flat buffers, which updates every parameter in place.

Why not torch.distributed.optim.ZeroRedundancyOptimizer: it assigns whole parameters to ranks, so a vocabulary
embedding (a third or more of a small GPT) leaves one rank with most of the state, and it has no gradient
sharding. The building blocks used here are torch's: AdamW on the shard, reduce-scatter (stage 2; gloo supports
it in this torch) and all-gather into one tensor (dist.reduce_scatter_single / all_gather_single, formerly
reduce_scatter_tensor / all_gather_into_tensor).

Step semantics are those of the unsharded path: gradients are the DP mean (experts: sum over expert-DP / DP,
megatron/grad_sync.py); the global gradient norm, the clip, the fp16 unscale/overflow check and the NaN check see
the same numbers; the LR schedule drives `param_groups` as usual. Checkpoints hold the gathered, per-parameter
Adam state (`full_state` / `load_full_state`), so a ZeRO run resumes at another DP size or without ZeRO.
A parameter that got no gradient in a step counts as a zero gradient (AdamW without ZeRO would skip it); in this
model every trainable parameter gets a gradient every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.config import OptimizerConfig
from megatron.errors import CheckpointError
from megatron.optimizer.optimizer import adamw, param_groups
from megatron.tensor_parallel import is_tensor_parallel_param
from moe.experts import is_expert_param

_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; "step" is one scalar per shard
# torch 2.13 renamed the tensor-in/tensor-out collectives (the old names warn); older torch has only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class _Bucket:
    params: List[torch.nn.Parameter]  # model parameters, now views of `flat`
    offsets: List[int]  # start of each parameter in `flat` (elements)
    group: Optional[object]  # the group the bucket shards over (None: one rank)
    world: int  # ranks in `group`
    rank: int  # this rank in `group`
    flat: torch.Tensor  # [world * shard_size] fp32: every parameter of the bucket, then zero padding
    shard: torch.nn.Parameter  # flat[rank * shard_size : (rank + 1) * shard_size], stepped by AdamW
    ep_size: Optional[int]  # the EP size of an expert bucket; None for dense

    @property
    def shard_size(self) -> int:
        return self.shard.numel()

    def pieces(self):
        """(param, slice of the param's flattened elements, slice of the shard) for each param overlapping the shard."""
        lo, hi = self.rank * self.shard_size, (self.rank + 1) * self.shard_size
        for p, off in zip(self.params, self.offsets):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                yield p, slice(a - off, b - off), slice(a - lo, b - lo)


def _group_size_rank(group):
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _make_bucket(params: List[torch.nn.Parameter], group, ep_size: Optional[int]) -> _Bucket:
    world, rank = _group_size_rank(group)
    dtype, device = params[0].dtype, params[0].device
    assert all(p.dtype == dtype and p.device == device for p in params), "a bucket mixes dtypes or devices"
    numel = sum(p.numel() for p in params)
    shard_size = math.ceil(numel / world)
    flat = torch.zeros(world * shard_size, dtype=dtype, device=device)
    offsets, off = [], 0
    with torch.no_grad():
        for p in params:
            flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = flat[off:off + p.numel()].view_as(p)  # the parameter now lives in the flat buffer
            offsets.append(off)
            off += p.numel()
    shard = torch.nn.Parameter(flat[rank * shard_size:(rank + 1) * shard_size])  # an alias, not a copy
    return _Bucket(params, offsets, group, world, rank, flat, shard, ep_size)


def _gather_to_rank0_cpu(shard: torch.Tensor, b: "_Bucket") -> Optional[torch.Tensor]:
    """The bucket's whole flat tensor on group rank 0, in CPU memory (None on the other ranks): a gather, not an
    all-gather, so only the writer ever holds the whole state (for one key of one bucket at a time on the device)."""
    if b.world == 1:
        return shard.cpu()
    dst = dist.get_global_rank(b.group, 0)
    parts = [torch.empty_like(shard) for _ in range(b.world)] if b.rank == 0 else None
    dist.gather(shard.contiguous(), parts, dst=dst, group=b.group)
    return torch.cat([t.cpu() for t in parts]) if parts is not None else None


class ZeroOptimizer:
    """AdamW with ZeRO stage 1 (state sharded) or 2 (state and reduced gradients sharded).

    Args:
        model: its trainable parameters are re-homed into flat per-bucket buffers (views; same Parameter objects).
        cfg: the optimizer flags (lr, betas, eps, weight decay: Megatron's param groups, optimizer.param_groups).
        groups: megatron.parallel_state.ParallelGroups (dp_group; expert_dp_group / ep_group per EP size).
        stage: 1 or 2.
    Communication: stage 2 `reduce_gradients` reduce-scatters each bucket over its group; `step` all-gathers each
    bucket; `clip_grad_norm` (stage 2) all-reduces norms; `full_state` all-gathers the Adam state. Every rank of a
    group must make the same calls in the same order (buckets are built in model order on every rank).
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, groups, stage: int):
        assert stage in (1, 2), stage
        self.stage = stage
        self.groups = groups
        self.buckets: List[_Bucket] = []
        inner_groups = []
        for g in param_groups(model, cfg.weight_decay):
            by_group: Dict[Optional[int], List[torch.nn.Parameter]] = {}
            for p in g["params"]:
                by_group.setdefault(getattr(p, "ep_size", 1) if g["moe"] else None, []).append(p)
            for ep in sorted(by_group, key=lambda e: -1 if e is None else e):
                b = _make_bucket(by_group[ep], self._shard_group(ep), ep)
                self.buckets.append(b)
                inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [b.shard]})
        self.optimizer = adamw(inner_groups, cfg)

    def _shard_group(self, ep_size: Optional[int]):
        g = self.groups
        if g is None or g.dp_size == 1:
            return None
        return g.dp_group if ep_size is None else g.expert_dp_group(ep_size)

    # ------------------------------------------------------------------------------------------- torch API
    @property
    def param_groups(self) -> List[dict]:
        """The inner AdamW's groups (one per bucket, with its param group's settings); the LR schedule sets lr."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """This rank's shard state (keyed by shard tensors); `full_state` gives the per-parameter view."""
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.shard.grad = None
            for p in b.params:
                p.grad = None

    def step(self) -> None:
        """AdamW on the owned slices, then every bucket's slices all-gathered into its flat buffer (the params).
        Stage 1 first copies the owned slice of the (already DP-reduced) full gradients into the shard's grad."""
        if self.stage == 1:
            for b in self.buckets:
                b.shard.grad = self._owned_grad_slice(b)
        self.optimizer.step()
        with torch.no_grad():
            for b in self.buckets:
                if b.world > 1:
                    _all_gather(b.flat, b.shard.detach().clone(), group=b.group)

    # ----------------------------------------------------------------------------------------- gradients
    def _owned_grad_slice(self, b: _Bucket) -> torch.Tensor:
        out = torch.zeros_like(b.shard)
        for p, src, dst in b.pieces():
            if p.grad is not None:
                out[dst].copy_(p.grad.reshape(-1)[src])
        return out

    def reduce_gradients(self) -> None:
        """Stage 2, in place of grad_sync.reduce_gradients: each bucket's local gradients (flattened as the params)
        are reduce-scattered over its group, so each rank receives only the sum for the slice it owns, then
        divided by the DP size (dense: the DP mean; experts: expert-DP sum / DP, as grad_sync). The full gradients
        are freed afterwards (they are whole until then: no reduction during the backward)."""
        dp = self.groups.dp_size if self.groups is not None else 1
        for b in self.buckets:
            flat_grad = torch.zeros_like(b.flat)
            for p, off in zip(b.params, b.offsets):
                if p.grad is not None:
                    flat_grad[off:off + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = None
            if b.world > 1:
                shard_grad = torch.empty_like(b.shard)
                _reduce_scatter(shard_grad, flat_grad, group=b.group)
            else:
                shard_grad = flat_grad
            if dp != 1:
                shard_grad.div_(dp)
            b.shard.grad = shard_grad

    def shard_params(self) -> List[torch.nn.Parameter]:
        """The owned slices as parameters; stage 2: their .grad are the reduced gradients (fp16 unscale/check)."""
        return [b.shard for b in self.buckets]

    def clip_grad_norm(self, max_norm: float) -> float:
        """Stage 2: the global L2 norm of the gradients from the owned slices, then clips them; returns the norm.

        The same sum as clip_grads.clip_grad_norm over grad_sync.norm_groups:
        1. per bucket, squared norms of the owned slice, split into tensor-parallel-sharded and replicated params
           (dense) or summed (experts, by EP size);
        2. all-reduce over the bucket's group: the slices of a bucket partition its gradients;
        3. the TP-sharded part summed over TP, each EP size's experts over its EP group; replicated counted once.
        """
        g = self.groups
        device = self.buckets[0].flat.device if self.buckets else torch.device("cpu")
        dense = torch.zeros(2, dtype=torch.float32, device=device)  # [replicated, TP-sharded]
        experts: Dict[int, torch.Tensor] = {}
        for b in self.buckets:
            if b.shard.grad is None:
                continue
            flat = b.shard.grad
            for p, _, dst in b.pieces():
                sq = torch.linalg.vector_norm(flat[dst].float()) ** 2
                if b.ep_size is None:
                    dense[1 if is_tensor_parallel_param(p) else 0] += sq
                else:
                    experts[b.ep_size] = experts.get(b.ep_size, torch.zeros((), device=device)) + sq
        if g is not None and g.dp_size > 1:
            dist.all_reduce(dense, group=g.dp_group)
        total = dense[0]
        tp_part = dense[1]
        if g is not None and g.tp_size > 1:
            dist.all_reduce(tp_part, group=g.tp_group)
        total = total + tp_part
        for ep in sorted({b.ep_size for b in self.buckets if b.ep_size is not None}):
            sq = experts.get(ep, torch.zeros((), device=device))
            edp = self._shard_group(ep)
            if edp is not None and dist.get_world_size(edp) > 1:
                dist.all_reduce(sq, group=edp)
            if g is not None and g.dp_size > 1 and ep > 1:
                dist.all_reduce(sq, group=g.ep_group(ep))
            total = total + sq
        total = torch.sqrt(total)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            grads = [b.shard.grad for b in self.buckets if b.shard.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return float(total)

    # -------------------------------------------------------------------------------------- checkpoints
    def full_state(self, writer_only: bool = False) -> Dict[torch.nn.Parameter, dict]:
        """{model parameter: {"step", "exp_avg", "exp_avg_sq"} of the whole parameter}, as an unsharded AdamW
        holds it ({} before the first step). Collective: gathers every bucket's state over its group.

        writer_only (checkpoints): a gather to group rank 0 of each bucket's group (the rank that writes that state)
        instead of an all-gather to every rank, into CPU memory (one bucket's state key on the device at a time); the
        other ranks get no entry for that bucket's parameters."""
        out: Dict[torch.nn.Parameter, dict] = {}
        for b in self.buckets:
            st = self.optimizer.state.get(b.shard)
            if not st:
                continue
            if writer_only:
                full = {k: _gather_to_rank0_cpu(st[k].detach(), b) for k in _STATE_KEYS}
                if full[_STATE_KEYS[0]] is None:  # not this bucket's writer
                    continue
                step = st["step"].detach().cpu()
            else:
                full = {}
                for k in _STATE_KEYS:
                    full[k] = torch.empty_like(b.flat)
                    if b.world > 1:
                        _all_gather(full[k], st[k].detach().contiguous(), group=b.group)
                    else:
                        full[k].copy_(st[k])
                step = st["step"].detach()
            for p, off in zip(b.params, b.offsets):
                out[p] = {"step": step.clone(),
                          **{k: full[k][off:off + p.numel()].view_as(p).clone() for k in _STATE_KEYS}}
        return out

    def load_full_state(self, state: Dict[torch.nn.Parameter, dict], where: str) -> None:
        """Loads per-parameter AdamW state (from a checkpoint written with or without ZeRO, at any DP size): each
        rank keeps the slice it owns. A bucket with state for only some of its parameters is refused."""
        for b in self.buckets:
            have = [p in state for p in b.params]
            if not any(have):
                continue
            if not all(have):
                names = sum(1 for h in have if not h)
                raise CheckpointError(f"{where}: optimizer state covers only part of a ZeRO bucket ({names} of "
                                      f"{len(have)} parameters missing); load with --no-load-optim")
            lo = b.rank * b.shard_size
            new = {"step": torch.as_tensor(state[b.params[0]]["step"], dtype=torch.float32).to(b.flat.device)}
            for k in _STATE_KEYS:
                flat = torch.zeros_like(b.flat)
                for p, off in zip(b.params, b.offsets):
                    flat[off:off + p.numel()].copy_(state[p][k].reshape(-1))
                new[k] = flat[lo:lo + b.shard_size].clone()
            self.optimizer.state[b.shard] = new

    def state_bytes(self) -> int:
        """Bytes of Adam state tensors held by this rank."""
        return sum(v.numel() * v.element_size() for st in self.optimizer.state.values() for v in st.values()
                   if torch.is_tensor(v))
