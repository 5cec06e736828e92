"""Top-k routers (DeepSpeed's TopKGate and megatron-core's TopKRouter semantics): fp32/fp64 logits with autocast
off, expert choice, capacity and token dropping, load-balancing (aux/seq/global) and z losses, the expert bias.

Shape legend: T tokens (local), D hidden, E experts (all, global ids), K top-k, P = T*K (token, choice)
pairs, N kept pairs (P minus dropped), B sequences, G expert groups.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.config import MoEConfig

JITTER_EPS = 1e-2  # DeepSpeed's multiplicative_jitter range: x * U(1 - eps, 1 + eps)

# Random draws reproduce deepspeed/moe/sharded_moe.py's torch.distributions draws bit for bit (same shapes, same
# order: jitter on the router input, then Gumbel noise on the logits, then the RTS uniforms), so from the same torch
# RNG state this router draws the same numbers as DeepSpeed's TopKGate and routes identically. They are written
# with torch.rand directly: a torch.distributions object per call copies its parameters host->device (a sync on
# CUDA). Uniform(low, high).rsample(shape) is `low + rand(shape) * (high - low)` with fp32 parameter tensors; the
# same arithmetic with Python scalars rounded to fp32 (_f32) gives the same bits (fp32 operands, fp32 ops).


def _f32(x: float) -> float:
    """x rounded to the nearest fp32 value (as torch.tensor(x) would store it)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _uniform(low: float, high: float, shape, device) -> torch.Tensor:
    """fp32 U(low, high) draws, bitwise DeepSpeed's Uniform(low, high).rsample(shape)."""
    lo = _f32(low)
    scale = _f32(_f32(high) - lo)  # fp32 (high - low): the exact difference of two fp32 values, rounded once
    return torch.rand(shape, dtype=torch.float32, device=device).mul_(scale).add_(lo)


def _gumbel(shape, device) -> torch.Tensor:
    """fp32 standard Gumbel draws, bitwise DeepSpeed's gumbel_rsample (torch's Gumbel(0, 1): the uniform base over
    [tiny, 1 - eps), then log, negate, log, negate)."""
    finfo = torch.finfo(torch.float32)
    u = _uniform(finfo.tiny, 1.0 - finfo.eps, shape, device)
    return u.log_().neg_().log_().neg_()


class Routing(NamedTuple):
    """One router decision for T local tokens.

    pair_idx_N: (token, choice) pairs as flat indices t*K + k into [T, K], grouped by expert. Dropless: all P
        pairs sorted by expert (stable: by token within an expert). With a capacity: the fixed-size [E*C] slot
        table, slot e*C + r = the pair in expert e's r-th slot (by priority), P for an empty slot; no host sync to
        build it (dispatch.compact_slots gives the [N] kept pairs, in the same order).
    counts_E: kept pairs per expert (sums to N); the dispatch split sizes.
    gates_TK: fp32 combine weights of every choice (differentiable; dropped pairs simply unused), computed in the
        router dtype (fp32/fp64) with autocast off.
    expert_TK: chosen expert ids.
    aux_loss, z_loss: scalar fp32 tensors (not multiplied by any coefficient); aux_loss is the load-balancing loss of
        the router's family and type (docs/design.md "Routers").
    tokens_per_expert_E: pairs routed to each expert before dropping (detached, int64).
    dropped_fraction: dropped pairs / P (detached fp32 scalar).
    capacity: slots per expert, or None when dropless.
    """
    pair_idx_N: torch.Tensor
    counts_E: torch.Tensor
    gates_TK: torch.Tensor
    expert_TK: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    dropped_fraction: torch.Tensor
    capacity: Optional[int]


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(ceil(T / E * (k * cf)), min_capacity) (DESIGN.md §3), rounded as DeepSpeed's _capacity does (the
    product in fp32), so both pick the same C at every token count. Pure Python (no tensor, so no `.item()` sync):
    fp32(T / E) * fp32(k * cf) is exact in double (two 24-bit significands), and rounding it to fp32 once is the
    fp32 multiplication torch performs."""
    c = math.ceil(_f32(_f32(num_tokens / max(num_experts, 1)) * _f32(capacity_factor * k)))
    return max(int(c), min_capacity)


ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}  # --moe-router-dtype


def no_autocast(device: torch.device):
    """A context with autocast off for `device`: the router's GEMM, scores, top-k and losses run in the router
    dtype even inside the model's bf16/fp16 autocast (which would lower F.linear to the compute dtype)."""
    kind = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return torch.autocast(kind, enabled=False)


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, jitter: bool, dtype: torch.dtype = torch.float32,
                  jitter_eps: float = JITTER_EPS) -> torch.Tensor:
    """Logits x·W_g in `dtype` (fp32 or fp64) whatever the model dtype and autocast; `jitter` multiplies the router
    input by U(1-eps, 1+eps).

    Softmax over bf16 logits would make the expert choice and the aux loss noisy (Switch Transformer's "selective
    precision"). Autocast is off here: under a bf16 autocast F.linear would otherwise run in bf16 although both
    operands are fp32 (issue 23, finding 3).
    """
    with no_autocast(x_TD.device):
        x_TD = x_TD.to(dtype)
        if jitter:
            x_TD = x_TD * _uniform(1.0 - jitter_eps, 1.0 + jitter_eps, x_TD.shape, x_TD.device).to(dtype)
        return F.linear(x_TD, weight_ED.to(dtype))


def choose_experts(logits_TE: torch.Tensor, probs_TE: torch.Tensor, k: int, gumbel_top1: bool,
                   second_expert_sampling: bool) -> torch.Tensor:
    """expert_TK, the k chosen experts per token (DeepSpeed's top1/top2/topkgating choices).

    k=1: argmax of the probabilities, or of logits + Gumbel noise (noisy policy 'RSample').
    k=2: first = argmax of the probabilities; second = argmax of the other logits, + Gumbel noise when
    `second_expert_sampling` (the Gumbel-max trick: a sample from the softmax over the remaining experts).
    k>2: the k largest probabilities, in descending order.
    """
    with torch.no_grad():
        if k == 1:
            scores_TE = logits_TE + _gumbel(logits_TE.shape, logits_TE.device) if gumbel_top1 else probs_TE
            return scores_TE.argmax(dim=1, keepdim=True)
        if k == 2:
            first_T = probs_TE.argmax(dim=1)
            scores_TE = logits_TE + _gumbel(logits_TE.shape, logits_TE.device) if second_expert_sampling \
                else logits_TE
            # the first choice's mask by scatter_ (F.one_hot checks its input's range with .item() off CUDA)
            first_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, first_T.unsqueeze(1), True)
            second_T = scores_TE.masked_fill(first_TE, float("-inf")).argmax(1)
            return torch.stack([first_T, second_T], dim=1)
        return probs_TE.topk(k, dim=1, sorted=True).indices


def drop_priority(policy: str, probs_TE: torch.Tensor, expert_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """[T, K] priorities (higher = kept first) of the (token, choice) pairs when an expert is over-full.

    'probs': the choice's router probability. 'position': every first choice before any second choice, earlier
    tokens first. 'any': DeepSpeed top-1 without RTS keeps what torch.topk returns over the equal one-hot scores of
    each expert's column (an order of torch's choosing, not the position), reproduced with the same call.
    """
    num_tokens, k = expert_TK.shape
    if policy == "probs":
        return probs_TE.detach().gather(1, expert_TK)
    if policy == "position":
        t_T1 = torch.arange(num_tokens, device=expert_TK.device).unsqueeze(1)
        k_1K = torch.arange(k, device=expert_TK.device).unsqueeze(0)
        return -(k_1K * num_tokens + t_T1)
    mask_TE = torch.zeros_like(probs_TE, dtype=torch.long).scatter_(1, expert_TK, 1)
    chosen = torch.topk(mask_TE, k=min(capacity, num_tokens), dim=0).indices
    keep_TE = mask_TE * torch.zeros_like(mask_TE).scatter_(0, chosen, 1)
    return keep_TE.gather(1, expert_TK)


def expert_counts(expert_P: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 number of entries equal to each expert id: a fixed-size scatter_add (bincount's output size is
    the data's maximum, a host sync on CUDA)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=expert_P.device).scatter_add_(
        0, expert_P, torch.ones_like(expert_P, dtype=torch.int64))


def assign_slots(expert_TK: torch.Tensor, priority_TK: Optional[torch.Tensor], num_experts: int,
                 capacity: Optional[int]):
    """Sort pairs by expert and drop those beyond `capacity`; returns (pair_idx, counts_E, routed_E).

    Dropless (capacity None): pair_idx is the [P] pairs sorted by expert (stable). With a capacity, each expert keeps
    its `capacity` highest-priority pairs: pairs are first ordered by priority (descending), then stably by expert,
    so the position within an expert's run is its rank; pair_idx is then the fixed-size [E*C] slot table: slot
    e*C + r holds the pair in expert e's r-th slot, or P (a sentinel) when expert e has fewer than r + 1 pairs.
    Fixed sizes throughout: no boolean mask, no data-dependent shape, no host sync. `dispatch.compact_slots`
    turns the table into the [N] kept pairs when the caller wants them.
    """
    expert_P = expert_TK.reshape(-1)
    routed_E = expert_counts(expert_P, num_experts)
    if capacity is None:
        pair_idx_N = torch.argsort(expert_P, stable=True)
        return pair_idx_N, routed_E, routed_E
    num_pairs = expert_P.numel()
    by_priority_P = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)
    order_P = by_priority_P[torch.argsort(expert_P[by_priority_P], stable=True)]
    expert_order_P = expert_P[order_P]
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    rank_P = torch.arange(num_pairs, device=order_P.device) - starts_E[expert_order_P]
    # kept pairs go to their slot; each dropped pair to its own overflow slot past E*C (unique indices: a
    # deterministic scatter), cut off below
    overflow_P = num_experts * capacity + torch.arange(num_pairs, device=order_P.device)
    slot_P = torch.where(rank_P < capacity, expert_order_P * capacity + rank_P, overflow_P)
    table = torch.full((num_experts * capacity + num_pairs,), num_pairs, dtype=order_P.dtype, device=order_P.device)
    table.scatter_(0, slot_P, order_P)
    return table[:num_experts * capacity], routed_E.clamp(max=capacity), routed_E


def combine_gates(probs_TE: torch.Tensor, expert_TK: torch.Tensor, pair_idx_N: torch.Tensor,
                  renormalize: str) -> torch.Tensor:
    """[T, K] fp32 combine weights. k=1: the router probability. k>=2: probabilities divided by their sum over the
    kept choices ('after_drop', DeepSpeed: computed over the dense [T, E] masked probabilities as DeepSpeed does, so
    the sums round identically) or over all k choices ('before_drop'). pair_idx_N: assign_slots' pair_idx (sorted
    pairs, or the slot table whose sentinel P marks empty slots)."""
    gates_TK = probs_TE.gather(1, expert_TK)
    k = expert_TK.shape[1]
    if k == 1:
        return gates_TK
    eps = torch.finfo(gates_TK.dtype).eps
    if renormalize == "before_drop":
        return gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(eps)
    num_pairs = expert_TK.numel()
    # one extra entry takes the slot table's sentinels (index_fill_ with a long index: fixed size, no sync)
    kept_TK = torch.zeros(num_pairs + 1, dtype=torch.bool, device=expert_TK.device).index_fill_(0, pair_idx_N, True)
    kept_TK = kept_TK[:num_pairs].view(expert_TK.shape)
    kept_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, expert_TK, kept_TK)
    denom_T1 = (probs_TE * kept_TE).sum(dim=-1, keepdim=True).clamp(min=eps)
    return (gates_TK * kept_TK) / denom_T1


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce SUM over `group`; backward: identity. For token statistics of sequence-parallel ranks
    (each holds a chunk of the same sequences): every rank computes the loss over all the group's tokens and
    differentiates it w.r.t. its own tokens' share; the router's gradient is then summed over the group."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def group_sum(t: torch.Tensor, group) -> torch.Tensor:
    """t summed over `group` (None: t itself); gradients pass through unchanged (see _SumOverGroup)."""
    if group is None:
        return t
    if not t.requires_grad:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t
    return _SumOverGroup.apply(t, group)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def gshard_aux_loss(probs_TE: torch.Tensor, expert_TK: torch.Tensor, choices: str, group=None) -> torch.Tensor:
    """E · Σ_e mean_t(probs[t, e]) · frac_e (GShard / Switch load-balancing loss, DeepSpeed's l_aux).

    frac_e: the fraction of tokens whose FIRST choice is e ('first': DeepSpeed's top-1 and top-2), or of all
    T·k choices that go to e ('all': DeepSpeed's top-k for k > 2, = its mean(me·ce)·E²/k). Counted before dropping.
    group: sequence-parallel ranks holding the other chunks of these sequences: means and fractions are over all
    their tokens (equal to the loss of the whole sequences on one rank).
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:  # a rank with no tokens gives 0, not NaN
        return probs_TE.new_zeros(())
    chosen = expert_TK[:, :1] if choices == "first" else expert_TK
    if group is not None:
        n = group_size(group)
        counts_E = group_sum(expert_counts(chosen.reshape(-1), num_experts).to(probs_TE.dtype), group)
        mean_E = group_sum(probs_TE.sum(dim=0), group) / (num_tokens * n)
        return num_experts * torch.sum(mean_E * counts_E / (chosen.numel() * n))
    frac_E = expert_counts(chosen.reshape(-1), num_experts).to(probs_TE.dtype) / chosen.numel()
    return num_experts * torch.sum(probs_TE.mean(dim=0) * frac_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean_t(logsumexp(logits_t)^2); pushes logits toward small magnitudes."""
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)


# --- megatron-core routing (router_family 'megatron'): the functions of megatron/core/transformer/moe/moe_utils.py
# (core_r0.16), op for op, so that on the same logits they choose the same experts (tests/unit/test_router_mcore.py)


def group_limited_topk(scores_TE: torch.Tensor, k: int, num_groups: int, group_topk: int):
    """(values_TK, expert_TK): top-k within the `group_topk` best of `num_groups` equal expert groups, a group
    scored by the sum of its best k/group_topk scores (DeepSeek-V2 device-limited, V3 node-limited routing)."""
    num_tokens, num_experts = scores_TE.shape
    group_TG = scores_TE.view(num_tokens, num_groups, -1).topk(k // group_topk, dim=-1)[0].sum(dim=-1)
    chosen_TG = torch.zeros_like(group_TG).scatter_(1, torch.topk(group_TG, k=group_topk, dim=-1, sorted=False)[1], 1)
    mask_TE = chosen_TG.unsqueeze(-1).expand(num_tokens, num_groups, num_experts // num_groups).reshape(num_tokens, -1)
    return scores_TE.masked_fill(~mask_TE.bool(), float("-inf")).topk(k, dim=-1)


def score_topk(logits_TE: torch.Tensor, k: int, score_function: str, pre_softmax: bool,
               num_groups: Optional[int] = None, group_topk: Optional[int] = None,
               expert_bias_E: Optional[torch.Tensor] = None, scaling_factor: Optional[float] = None):
    """(gates_TK, expert_TK): megatron-core's topk_routing_with_score_function.

    softmax, pre_softmax: gates = the k largest of softmax(logits) (not renormalised);
    softmax: the k largest logits, gates = their softmax (renormalised over the chosen k);
    sigmoid: scores = sigmoid(logits); choice by scores + expert_bias (bias for the choice only, never in the
        weights); gates = chosen scores / their sum (k > 1);
    then gates *= scaling_factor. Group-limited routing restricts each choice to group_topk groups.
    """
    def topk(scores_TE):
        if group_topk:
            return group_limited_topk(scores_TE, k, num_groups, group_topk)
        return torch.topk(scores_TE, k=k, dim=1)

    if score_function == "softmax":
        if pre_softmax:
            gates_TK, expert_TK = topk(torch.softmax(logits_TE, dim=-1))
        else:
            top_TK, expert_TK = topk(logits_TE)
            gates_TK = torch.softmax(top_TK, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
        if expert_bias_E is not None:
            expert_TK = topk(scores_TE + expert_bias_E)[1]
            gates_TK = scores_TE.gather(1, expert_TK)
        else:
            gates_TK, expert_TK = topk(scores_TE)
        if k > 1:
            gates_TK = gates_TK / (gates_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor:
        gates_TK = gates_TK * scaling_factor
    return gates_TK, expert_TK


def _counting() -> bool:
    """Whether this forward counts tokens for the expert bias and global_aux_loss: with gradients on (not evaluation)
    and not inside a backward pass (the recompute of a non-reentrant activation checkpoint runs there; counting
    again would double the loads and change global_aux_loss between the forward and its recompute)."""
    return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1


def megatron_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """megatron-core's get_capacity(T·k, E, cf) = ceil(T·k / E · cf) (no lower bound); host ints only, no sync."""
    return math.ceil((num_tokens * k / num_experts) * capacity_factor)


def capacity_priority(gates_TK: torch.Tensor, expert_TK: torch.Tensor, num_experts: int, capacity: int,
                      policy: str) -> torch.Tensor:
    """[T, K] 1.0 for the pairs megatron-core's apply_router_token_dropping keeps, 0.0 for those it drops.

    Each expert keeps `capacity` of its pairs: 'probs' the highest combine weights, 'position' what torch.topk
    returns over the 0/1 routing map's column (megatron-core's call, reproduced). Kept pairs number at most
    `capacity` per expert, so assign_slots with this priority keeps exactly them.
    """
    num_tokens = gates_TK.shape[0]
    if capacity > num_tokens:
        return torch.ones_like(gates_TK)
    if policy == "probs":
        score_TE = torch.zeros(num_tokens, num_experts, dtype=gates_TK.dtype, device=gates_TK.device)
        score_TE = score_TE.scatter(1, expert_TK, gates_TK.detach())
    else:
        score_TE = torch.zeros(num_tokens, num_experts, dtype=torch.int32, device=gates_TK.device)
        score_TE = score_TE.scatter(1, expert_TK, 1)
    kept_TE = torch.zeros(num_tokens, num_experts, dtype=gates_TK.dtype, device=gates_TK.device)
    kept_TE = kept_TE.scatter(0, torch.topk(score_TE, k=capacity, dim=0, sorted=False)[1], 1.0)
    return kept_TE.gather(1, expert_TK)


def aux_loss_scores(logits_TE: torch.Tensor, k: int, score_function: str):
    """(scores_TE, routed_TE) for the load-balancing losses (megatron-core's compute_routing_scores_for_aux_loss):
    softmax(logits), or sigmoid(logits) normalised over experts; routed_TE is the 0/1 map of their top-k (no expert
    bias, no groups: the loss balances the router's own preference)."""
    if score_function == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
        scores_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    routed_TE = torch.zeros_like(scores_TE).scatter(1, torch.topk(scores_TE, k=k, dim=1)[1], 1.0)
    return scores_TE, routed_TE


def switch_balance_loss(score_sum_E: torch.Tensor, tokens_E: torch.Tensor, k: int, num_tokens: float,
                        total_tokens: float) -> torch.Tensor:
    """E · Σ_e P_e · f_e with P_e = score_sum_E / num_tokens (mean score over the tokens the scores came from) and
    f_e = tokens_E / (k · total_tokens) (fraction of the k·total choices that went to e, counted over the batch
    that defines the loss). megatron-core's switch_load_balancing_loss_func is this with num_tokens = total_tokens
    (its global_aux_loss divides by the global count twice: see docs/design.md "Routers")."""
    num_experts = score_sum_E.shape[-1]
    if num_tokens == 0:  # a rank with no tokens gives 0, not NaN
        return score_sum_E.new_zeros(())
    return torch.sum(score_sum_E * tokens_E) * (num_experts / (k * num_tokens * total_tokens))


def causal_centered(x_TD: torch.Tensor, num_sequences: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """--moe-router-center-input causal (docs/routing_health.md): each token's router input minus the mean of the
    router inputs of the EARLIER tokens of its own sequence (detached), scaled to RMS 1 per token.

    Early in training the hidden states fall into one common direction (its share of |x|^2 goes from ~0.03 to ~0.99
    within 5-7 steps, carried by the attention outputs), every token's logits move together and one expert takes
    every token whatever the bias or aux loss. Subtracting the running mean of the earlier tokens removes that
    direction using only positions <= t (no later position, no other sequence: the same in training, evaluation and
    generation); the RMS scaling keeps the centred logits at their initial scale as the common share rises and falls,
    so the expert bias's fixed step means the same throughout. A sequence's first token has no earlier token: its
    input is only scaled. x_TD: [B*S, D], the B = num_sequences sequences one after another; fp32/fp64 (the
    router's dtype). Cost: a cumulative sum and a norm over [T, D]; no host sync, no state."""
    if x_TD.shape[0] == 0:
        return x_TD
    x_BSD = x_TD.view(max(num_sequences, 1), -1, x_TD.shape[-1])
    detached = x_BSD.detach()
    earlier_BSD = torch.cumsum(detached, dim=1) - detached  # sum over positions < t
    count_1S1 = torch.arange(x_BSD.shape[1], device=x_TD.device, dtype=x_TD.dtype).clamp(min=1).view(1, -1, 1)
    y_BSD = x_BSD - earlier_BSD / count_1S1
    y_BSD = y_BSD * torch.rsqrt(y_BSD.square().mean(dim=-1, keepdim=True) + eps)
    return y_BSD.reshape(x_TD.shape)


class TopKRouter(nn.Module):
    """Linear router choosing k of E experts per token (fp32/fp64, autocast off), with capacity-based dropping.

    Args:
        cfg: MoEConfig; router_family picks DeepSpeed TopKGate's routing or megatron-core TopKRouter's.
        hidden_size: D.
        init_method: fills the [E, D] weight in place (default: nn.Linear's init).
        num_experts: E of this layer (default: cfg's single expert count).
        dp_group: the data-parallel group (all ranks with other tokens: EP ranks included, TP ranks excluded, as
            they route the same tokens); global_aux_loss all-reduces its per-micro-batch expert counts over it.
    Buffers (megatron family): expert_bias [E] fp32 (persistent, in checkpoints), local_tokens_per_expert [E] (kept
    pairs since the last step_routers), global_tokens_per_expert/ga_steps (global_aux_loss).
    sp_group (attribute, set by the model under --sequence-parallel): the TP ranks holding the other chunks of this
    rank's sequences; the losses' token statistics and the kept-pair counts are summed over it, so they equal the
    values of the whole sequences (capacity, when tokens are dropped, stays per rank, as in Megatron-LM).
    """

    sp_group = None

    def __init__(self, cfg: MoEConfig, hidden_size: int, init_method=None, num_experts: Optional[int] = None,
                 dp_group=None):
        super().__init__()
        if num_experts is None:
            if len(cfg.num_experts) != 1:
                raise ValueError("TopKRouter needs num_experts when MoEConfig has one count per MoE layer")
            num_experts = cfg.num_experts[0]
        self.cfg, self.num_experts, self.k, self.dp_group = cfg, num_experts, cfg.topk, dp_group
        self.dtype = ROUTER_DTYPES[cfg.router_dtype]
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        if init_method is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            with torch.no_grad():
                init_method(self.weight)
        megatron = cfg.router_family == "megatron"
        biased, global_aux = megatron and cfg.expert_bias, megatron and cfg.load_balancing_type == "global_aux_loss"
        zeros_E = torch.zeros(num_experts, dtype=torch.float32)
        # None when unused: a registered None buffer is left out of state_dict (older checkpoints load as they are)
        self.register_buffer("expert_bias", zeros_E.clone() if biased else None)
        self.register_buffer("local_tokens_per_expert", zeros_E.clone() if biased else None, persistent=False)
        self.register_buffer("global_tokens_per_expert", zeros_E.clone() if global_aux else None, persistent=False)
        self.register_buffer("ga_steps", torch.zeros(()) if global_aux else None, persistent=False)
        # --moe-router-center-input: the moving average of training token means (evaluation subtracts it) and how
        # many training forwards it has seen; persistent (checkpoints carry it)
        batch_centering = cfg.router_input_centering == "batch"  # 'causal' keeps no state
        self.register_buffer("input_mean", torch.zeros(hidden_size) if batch_centering else None)
        self.register_buffer("input_mean_count", torch.zeros(()) if batch_centering else None)
        # --moe-router-input-whitening-momentum (issue 28): the moving covariance of the causally centred inputs,
        # its forwards seen and W = Sigma^-1/2 (float64, persistent: checkpoints carry them; identity until the first
        # training forward)
        whiten = cfg.router_input_whitening is not None
        self.register_buffer("input_cov", torch.zeros(hidden_size, hidden_size, dtype=torch.float64)
                             if whiten else None)
        self.register_buffer("input_cov_count", torch.zeros((), dtype=torch.float64) if whiten else None)
        self.register_buffer("input_whiten", torch.eye(hidden_size, dtype=torch.float64) if whiten else None)

    _FP32_BUFFERS = ("expert_bias", "local_tokens_per_expert", "global_tokens_per_expert", "ga_steps")
    _CENTERING_BUFFERS = ("input_mean", "input_mean_count",  # fp32 too (--moe-router-center-input)
                          "input_cov", "input_cov_count", "input_whiten")  # float64 (whitening) kept as they are
    INPUT_MEAN_MOMENTUM = 0.9  # the moving average's weight on its past (a plain mean over the first 10 forwards)

    def _apply(self, fn, recurse=True):
        """Module.to/.bfloat16()/.half() move the router's buffers but keep them fp32 (megatron-core's
        _maintain_float32_expert_bias): a bf16 bias would misroute near ties, bf16 counts stop being exact at 257."""
        kept = {name: getattr(self, name) for name in self._FP32_BUFFERS + self._CENTERING_BUFFERS
                if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, fp32 in kept.items():
            setattr(self, name, fp32.to(device=getattr(self, name).device))
        return self

    def forward(self, x_TD: torch.Tensor, num_sequences: int = 1) -> Routing:
        """x_TD: [T, D] tokens, batch-first ([B, S] flattened: the B = num_sequences sequences one after another,
        which seq_aux_loss needs). Autocast is off throughout: every float here is in the router dtype."""
        with no_autocast(x_TD.device):
            if self.cfg.router_input_centering == "causal":
                x_TD = x_TD.to(self.dtype)
                if self.input_whiten is not None:
                    x_TD = self._whitened(x_TD, num_sequences)
                x_TD = causal_centered(x_TD, num_sequences)
            else:
                x_TD = self._centered(x_TD)
            if self.cfg.router_family == "megatron":
                return self._route_megatron(x_TD, num_sequences)
            return self._route_deepspeed(x_TD)

    def _whitened(self, x_TD: torch.Tensor, num_sequences: int) -> torch.Tensor:
        """--moe-router-input-whitening-momentum m (docs/routing_health.md, issue 28): x · W, W = Sigma^-1/2 of the
        moving covariance Sigma of causal_centered(x) (eigenvalues floored at 1e-3 x the largest). After the causal
        centring the hidden states still grow a few dominant directions in which tokens differ; once those dominate
        every token's RMS-scaled router input, one router row wins most tokens (max/mean 2-4 at iterations 20-43 of
        the demo); W equalises the directions. W comes from earlier micro-batches only (a training forward folds its
        own covariance in after use: Sigma += max(1/n, 1 - m) (cov - Sigma), then W is recomputed; not in a
        recompute or without gradients), so no position sees a later one; evaluation and generation use W as it
        is. The covariance is taken over the whole data-parallel micro-batch (one SUM all-reduce over dp_group of
        [D*D + 1] float64 per training forward, as global_aux_loss's counts), so every DP rank keeps the same Sigma
        and W and routes as one process with the global micro-batch would. Cost per training forward: that
        all-reduce and a float64 eigendecomposition of [D, D] (on CUDA, torch.linalg.eigh may synchronise): cheap
        at D = 128, prohibitive at D = 7168 (a demo/study-scale fix, docs/routing_health.md)."""
        refreshing = _REFRESH["on"]  # refresh_whitening: W is updated first, so deeper routers see this layer's new W
        y_TD = None if refreshing else x_TD @ self.input_whiten.to(x_TD.dtype)
        if ((self.training and _counting()) or refreshing) and x_TD.shape[0] > 0:
            with torch.no_grad():
                c_TD = causal_centered(x_TD.detach().double(), num_sequences)
                group = self.dp_group
                if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
                    d = c_TD.shape[1]
                    flat = torch.cat([(c_TD.T @ c_TD).reshape(-1), c_TD.new_full((1,), c_TD.shape[0])])
                    dist.all_reduce(flat, group=group)
                    cov_DD = flat[:-1].view(d, d) / flat[-1]
                else:
                    cov_DD = c_TD.T @ c_TD / c_TD.shape[0]
                self.input_cov_count += 1
                rate = torch.clamp(1.0 / self.input_cov_count, min=1.0 - self.cfg.router_input_whitening)
                self.input_cov += rate * (cov_DD - self.input_cov)
                ev_D, vec_DD = torch.linalg.eigh(self.input_cov)
                floor = 1e-3 * ev_D.max()
                self.input_whiten.copy_((vec_DD * torch.maximum(ev_D, floor).rsqrt()) @ vec_DD.T)
        return x_TD @ self.input_whiten.to(x_TD.dtype) if refreshing else y_TD

    def _centered(self, x_TD: torch.Tensor) -> torch.Tensor:
        """--moe-router-center-input batch (docs/routing_health.md): early in training the hidden states fall into one
        common direction (its share of |x|^2 goes from ~0.03 to ~0.99 within a few steps), every token's logits then
        move together and one expert takes them all, whatever the bias or aux loss. Subtracting the token mean
        keeps what tells tokens apart. Training: this micro-batch's mean (detached; a token's routing depends on the
        batch mean, as BatchNorm), folded into the moving average input_mean (not in a recompute or without
        gradients); evaluation and no-grad forwards: input_mean. Per rank (not reduced over data parallel)."""
        if self.input_mean is None or x_TD.shape[0] == 0:
            return x_TD
        if not (self.training and torch.is_grad_enabled()):
            return x_TD - self.input_mean.to(x_TD.dtype)
        mean_D = x_TD.detach().float().mean(dim=0)
        if _counting():
            with torch.no_grad():
                self.input_mean_count += 1
                rate = torch.clamp(1.0 / self.input_mean_count, min=1.0 - self.INPUT_MEAN_MOMENTUM)
                self.input_mean += rate * (mean_D - self.input_mean)
        return x_TD - mean_D.to(x_TD.dtype)

    def _route_deepspeed(self, x_TD: torch.Tensor) -> Routing:
        """DeepSpeed's TopKGate + top1/top2/topkgating order, so random draws line up:
        1. logits (input jitter in training with 'Jitter'); softmax;
        2. expert choice (Gumbel noise for 'RSample' top-1 in training, for top-2 second-expert sampling);
        3. capacity and drop priority (RTS uniforms over [T, E], or drop_policy), then slots;
        4. combine weights (renormalised over kept or all choices), aux and z losses.
        """
        cfg = self.cfg
        noise = cfg.noisy_gate_policy if self.training else None
        logits_TE = router_logits(x_TD, self.weight, jitter=noise == "Jitter", dtype=self.dtype)
        probs_TE = torch.softmax(logits_TE, dim=1)
        expert_TK = choose_experts(logits_TE, probs_TE, self.k, gumbel_top1=noise == "RSample",
                                   second_expert_sampling=cfg.second_expert_sampling)
        num_tokens = x_TD.shape[0]
        capacity = priority_TK = None
        if cfg.drop_tokens:
            cf = cfg.train_capacity_factor if self.training else cfg.eval_capacity_factor
            capacity = expert_capacity(num_tokens, self.num_experts, self.k, cf, cfg.min_capacity)
            if cfg.use_rts and cfg.rts_scope == "top1" and self.k == 1:
                # DeepSpeed's top1gating: one uniform per (token, expert), in training and eval
                priority_TK = _uniform(0.0, 1.0, probs_TE.shape, x_TD.device).gather(1, expert_TK)
            elif cfg.use_rts and cfg.rts_scope == "train" and self.training:
                priority_TK = torch.rand(expert_TK.shape, device=x_TD.device)
            else:
                priority_TK = drop_priority(cfg.drop_policy, probs_TE, expert_TK, capacity)
        pair_idx_N, counts_E, routed_E = assign_slots(expert_TK, priority_TK, self.num_experts, capacity)
        gates_TK = combine_gates(probs_TE, expert_TK, pair_idx_N, cfg.renormalize)
        aux_loss = gshard_aux_loss(probs_TE, expert_TK, cfg.aux_loss_choices, self.sp_group)
        return self._routing(pair_idx_N, counts_E, gates_TK, expert_TK, aux_loss, logits_TE, routed_E, capacity)

    def _route_megatron(self, x_TD: torch.Tensor, num_sequences: int) -> Routing:
        """megatron-core's TopKRouter.forward:
        1. logits in the router dtype (input jitter in training with --moe-input-jitter-eps);
        2. scores, expert choice (groups, expert bias) and combine weights (score_topk);
        3. capacity mode: each expert keeps `capacity` pairs by drop policy (capacity_priority), then slots;
        4. the load-balancing loss of its type and the z-loss; kept pairs counted for the expert-bias update.
        """
        cfg = self.cfg
        eps = cfg.input_jitter_eps if self.training else None
        logits_TE = router_logits(x_TD, self.weight, jitter=eps is not None, dtype=self.dtype,
                                  jitter_eps=eps or 0.0)
        gates_TK, expert_TK = score_topk(logits_TE, self.k, cfg.score_function, cfg.pre_softmax, cfg.num_groups,
                                         cfg.group_topk, self.expert_bias, cfg.topk_scaling_factor)
        capacity = priority_TK = None
        if cfg.drop_tokens:
            capacity = megatron_capacity(x_TD.shape[0], self.num_experts, self.k, cfg.train_capacity_factor)
            priority_TK = capacity_priority(gates_TK, expert_TK, self.num_experts, capacity, cfg.drop_policy)
        pair_idx_N, counts_E, routed_E = assign_slots(expert_TK, priority_TK, self.num_experts, capacity)
        if self.local_tokens_per_expert is not None and _counting():
            with torch.no_grad():
                kept_E = group_sum(counts_E.to(self.local_tokens_per_expert.dtype), self.sp_group)
                self.local_tokens_per_expert += kept_E
        aux_loss = self.load_balancing_loss(logits_TE, num_sequences)
        return self._routing(pair_idx_N, counts_E, gates_TK, expert_TK, aux_loss, logits_TE, routed_E, capacity)

    def load_balancing_loss(self, logits_TE: torch.Tensor, num_sequences: int = 1) -> torch.Tensor:
        """The megatron family's load-balancing loss (unscaled; docs/design.md "Routers" states each definition):
        aux_loss over this micro-batch, seq_aux_loss per sequence (mean over the micro-batch's sequences),
        global_aux_loss with expert counts of the global batch (summed over dp_group, averaged over the step's
        micro-batches so far; outside training with gradients, the micro-batch's own counts), 'none' = 0."""
        kind, k = self.cfg.load_balancing_type, self.k
        if kind == "none":
            return logits_TE.new_zeros(())
        scores_TE, routed_TE = aux_loss_scores(logits_TE, k, self.cfg.score_function)
        num_tokens = scores_TE.shape[0]
        g, n = self.sp_group, group_size(self.sp_group)  # sequence parallel: statistics over the chunks of the group
        if kind == "seq_aux_loss":
            seq_len = num_tokens // max(num_sequences, 1)
            if seq_len * num_sequences != num_tokens:
                raise ValueError(f"seq_aux_loss: {num_tokens} tokens are not {num_sequences} equal sequences")
            sums_BE = group_sum(scores_TE.view(num_sequences, seq_len, -1).sum(dim=1), g)
            counts_BE = group_sum(routed_TE.view(num_sequences, seq_len, -1).sum(dim=1), g)
            return switch_balance_loss(sums_BE, counts_BE, k, seq_len * n, seq_len * n) / num_sequences
        counts_E = group_sum(routed_TE.sum(dim=0), g)
        score_sum_E = group_sum(scores_TE.sum(dim=0), g)
        num_tokens *= n
        if kind == "global_aux_loss" and self.global_tokens_per_expert is not None and self.training \
                and torch.is_grad_enabled():
            group = self.dp_group
            dp_size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
            if _counting():  # a recompute reuses the counts its forward accumulated (same value, no collective)
                counts_E = counts_E.float()
                if dp_size > 1:
                    dist.all_reduce(counts_E, group=group)
                with torch.no_grad():
                    self.global_tokens_per_expert += counts_E
                    self.ga_steps += 1
            counts_E = (self.global_tokens_per_expert / self.ga_steps).to(scores_TE.dtype)
            return switch_balance_loss(score_sum_E, counts_E, k, num_tokens, num_tokens * dp_size)
        return switch_balance_loss(score_sum_E, counts_E, k, num_tokens, num_tokens)

    def _routing(self, pair_idx_N, counts_E, gates_TK, expert_TK, aux_loss, logits_TE, routed_E, capacity):
        """The Routing tuple: fp32 combine weights and losses (fp64 routers compute in fp64, then round once)."""
        if self.cfg.z_loss_coeff > 0 and self.sp_group is not None:  # mean over the sequence-parallel group's tokens
            z_loss = (group_sum(torch.logsumexp(logits_TE, dim=-1).square().sum(), self.sp_group)
                      / max(logits_TE.shape[0] * group_size(self.sp_group), 1))
        else:
            z_loss = router_z_loss(logits_TE) if self.cfg.z_loss_coeff > 0 else logits_TE.new_zeros(())
        num_pairs = max(expert_TK.numel(), 1)
        return Routing(
            pair_idx_N=pair_idx_N, counts_E=counts_E, gates_TK=gates_TK.float(), expert_TK=expert_TK,
            aux_loss=aux_loss.float(), z_loss=z_loss.float(), tokens_per_expert_E=routed_E.detach(),
            dropped_fraction=1.0 - counts_E.sum().to(torch.float32) / num_pairs,
            capacity=capacity)


_REFRESH = {"on": False}  # refresh_whitening's forward: the whitening folds in without gradients


class _RefreshDone(Exception):
    """Raised after the last whitened router of a refresh forward: nothing after it is needed."""


@torch.no_grad()
def refresh_whitening(model: nn.Module, forward: Callable[[], object]) -> bool:
    """--moe-router-input-whitening-refresh (issue 28, docs/routing_health.md): after the optimizer step, forward()
    (the model on the step's last micro-batch, tokens it has already trained on) runs without gradients up to the
    last whitened router, and every whitened router folds that micro-batch's covariance in as a training forward
    would (DP all-reduce included), then routes it with the new W, so that a deeper router's covariance is of the
    inputs it will get next step; the next step's first micro-batch routes with a W of the current parameters
    instead of the previous step's: during fast learning the stale W let a block of tokens into one expert (max/mean
    up to 4.2 on the study configs). No position sees a later token. The expert-bias and global_aux_loss counts are
    untouched (no gradients: not counted). Every rank of the model's groups must call it (collectives inside).
    Returns whether a router was refreshed."""
    whitened = [r for r in routers(model) if r.input_whiten is not None]
    if not whitened:
        return False

    def stop(*_):
        raise _RefreshDone

    hook = whitened[-1].register_forward_hook(stop)
    _REFRESH["on"] = True
    try:
        forward()
    except _RefreshDone:
        pass
    finally:
        _REFRESH["on"] = False
        hook.remove()
    return True


def routers(model_or_routers: Union[nn.Module, Iterable[nn.Module]]):
    """The TopKRouters in a model (or an iterable of models/routers), in module order."""
    mods = [model_or_routers] if isinstance(model_or_routers, nn.Module) else list(model_or_routers)
    return [r for m in mods for r in m.modules() if isinstance(r, TopKRouter)]


@torch.no_grad()
def step_routers(model_or_routers, dp_group=None) -> None:
    """Once per optimizer step, after it: the aux-loss-free expert-bias update and the global_aux_loss reset.

    1. one all-reduce (SUM over dp_group: every rank with other tokens, EP ranks included) of every router's kept
       pairs per expert since the last call, concatenated;
    2. expert_bias += bias_update_rate · sign(mean_e load - load_e) (megatron-core's get_updated_expert_bias,
       DeepSeek-V3's aux-loss-free balancing), or with bias_update_type 'proportional' (not in megatron-core)
       bias_update_rate · (mean_e load - load_e) / max(mean_e load, 1); the counts restart from 0;
    3. global_aux_loss's accumulated counts restart from 0.
    Identical on every rank of dp_group, so the buffer stays replicated; it is a persistent buffer, so checkpoints
    carry it and a resumed run continues exactly.
    """
    found = routers(model_or_routers)
    biased = [r for r in found if r.expert_bias is not None]
    if biased:
        counts = torch.cat([r.local_tokens_per_expert for r in biased])
        if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(counts, group=dp_group)
        for r, c_E in zip(biased, counts.split([r.num_experts for r in biased])):
            mean = c_E.sum() / c_E.numel()
            offset_E = mean - c_E
            if r.cfg.bias_update_type == "proportional":  # issue 28: the step grows with the relative load gap
                step_E = offset_E / mean.clamp(min=1.0)
            else:
                step_E = torch.sign(offset_E)
            r.expert_bias.add_(step_E * r.cfg.bias_update_rate)
            r.local_tokens_per_expert.zero_()
    for r in found:
        if r.global_tokens_per_expert is not None:
            r.global_tokens_per_expert.zero_()
            r.ga_steps.zero_()
