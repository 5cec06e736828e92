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
Adam state (`state_dict` / `load_state_dict`), so a ZeRO run resumes at another DP size or without ZeRO.
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
from megatron.optimizer.adamw import adamw, param_groups
from megatron.optimizer.base import MegatronOptimizer
from megatron.optimizer.clip_grads import NormPart
from megatron.tensor_parallel import is_tensor_parallel_param

_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state; "step" is one scalar per shard
# torch 2.13 renamed the tensor-in/tensor-out collectives (the old names warn); older torch has only the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(eq=False)  # hashed by identity: the overlapped reduction keys its work by bucket
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


class ZeroOptimizer(MegatronOptimizer):
    """AdamW with ZeRO stage 1 (state sharded) or 2 (state and reduced gradients sharded).

    Args:
        model: its trainable parameters are re-homed into flat per-bucket buffers (views; same Parameter objects).
        cfg: the optimizer flags (lr, betas, eps, weight decay: Megatron's param groups, adamw.param_groups).
        groups: megatron.parallel_state.ParallelGroups (dp_group; expert_dp_group / ep_group per EP size).
        stage: 1 or 2.
    Communication: stage 2 `reduce_gradients` reduce-scatters each bucket over its group; `step_with_ready_grads`
    all-gathers each bucket; `clip_grad_norm` all-reduces norms; `state_dict` all-gathers the Adam state. Every
    rank of a group must make the same calls in the same order (buckets are built in model order on every rank).
    Stage 1 reduces, unscales and clips whole gradients as AdamWOptimizer does; only the update is sharded.
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
        self._launched: Dict[_Bucket, tuple] = {}  # bucket -> (its owned gradient slice, async handle or None)
        super().__init__(adamw(inner_groups, cfg), model, cfg, groups)

    def _shard_group(self, ep_size: Optional[int]):
        g = self.groups
        if g is not None and ep_size is not None:  # expert-DP: may span TP (and CP, on the expert grid), issue 27
            return g.expert_dp_group(ep_size)
        if g is None or g.dp_size == 1:
            return None
        return g.dp_group if ep_size is None else g.expert_dp_group(ep_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.shard.grad = None
            for p in b.params:
                p.grad = None

    def step_with_ready_grads(self) -> None:
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
        are freed as each bucket is flattened. With --overlap-grad-reduce a bucket's reduce-scatter was started by
        the hook of its last gradient during the backward; this waits for it. Stage 1: the base's."""
        if self.stage == 1:
            return super().reduce_gradients()
        for b in self.buckets:
            if b not in self._launched:
                self._launch_reduce_scatter(b)
        dp = self.groups.dp_size if self.groups is not None else 1
        for b in self.buckets:
            shard_grad, handle = self._launched.pop(b)
            if handle is not None:
                handle.wait()
            if dp != 1:
                shard_grad.div_(dp)
            b.shard.grad = shard_grad
        if self.reducer is not None:
            self.reducer.armed = False

    def _launch_reduce_scatter(self, b: _Bucket) -> None:
        flat_grad = torch.zeros_like(b.flat)
        for p, off in zip(b.params, b.offsets):
            if p.grad is not None:
                flat_grad[off:off + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None
        if b.world > 1:
            shard_grad = torch.empty_like(b.shard)
            self._launched[b] = (shard_grad, _reduce_scatter(shard_grad, flat_grad, group=b.group, async_op=True))
        else:
            self._launched[b] = (flat_grad, None)

    def _overlapped_reducer(self, cfg: OptimizerConfig):
        return super()._overlapped_reducer(cfg) if self.stage == 1 else _ShardReducer(self)

    def main_params(self) -> List[torch.nn.Parameter]:
        """Stage 2: the owned slices as parameters (their .grad are the reduced gradients); stage 1: the base's."""
        return [b.shard for b in self.buckets] if self.stage == 2 else super().main_params()

    def norm_parts(self) -> List[NormPart]:
        """Stage 2: the owned slices of the gradients, in the base's parts (TP-replicated dense, TP-sharded dense,
        experts by EP size); each part's squared norm is first summed over the bucket's group (the slices of a
        bucket partition its gradients), then over TP or EP as in the unsharded sum. Stage 1: the base's."""
        if self.stage == 1:
            return super().norm_parts()
        g = self.groups
        replicated, tp, experts = [], [], {}
        for b in self.buckets:
            if b.shard.grad is None:
                continue
            for p, _, dst in b.pieces():
                piece = b.shard.grad[dst]
                if b.ep_size is not None:
                    experts.setdefault(b.ep_size, []).append(piece)
                else:
                    (tp if is_tensor_parallel_param(p) else replicated).append(piece)
        parts = [(replicated, (self._shard_group(None),)),
                 (tp, (self._shard_group(None), g.tp_group if g is not None and g.tp_size > 1 else None))]
        for ep in sorted({b.ep_size for b in self.buckets if b.ep_size is not None}):
            parts.append((experts.get(ep, []), (self._shard_group(ep), g.expert_norm_group(ep) if g is not None else None)))
        return parts

    # -------------------------------------------------------------------------------------- checkpoints
    def _state_by_param(self, writer_only: bool = False) -> Dict[torch.nn.Parameter, dict]:
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
                # each parameter its own step tensor: a plain AdamW loading this increments every one in place, and
                # one tensor shared by a bucket's parameters (as torch.save keeps it) would count N steps per step
                out[p] = {"step": step.clone(),  # the rest: views of the fresh buffers (state_dict copies them)
                          **{k: full[k][off:off + p.numel()].view_as(p) for k in _STATE_KEYS}}
        return out

    def _load_by_param(self, state: Dict[torch.nn.Parameter, dict], where: str) -> None:
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


class _ShardReducer:
    """ZeRO-2 under --overlap-grad-reduce: a bucket's reduce-scatter starts from the hook of the last of its
    parameters to receive its gradient in the armed (last micro-batch's) backward; `reduce_gradients` waits."""

    def __init__(self, opt: ZeroOptimizer):
        self.opt, self.armed = opt, False
        self.hook_launches = 0  # buckets launched from a hook, while the backward ran
        self.pending: Dict[_Bucket, int] = {}
        self.bucket_of = {p: b for b in opt.buckets for p in b.params}
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.bucket_of]

    def arm(self) -> None:
        self.armed = True
        self.pending = {b: len(b.params) for b in self.opt.buckets}

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        b = self.bucket_of[p]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self.opt._launch_reduce_scatter(b)
            self.hook_launches += 1

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
