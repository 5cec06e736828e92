"""Top-k router: fp32 logits, expert choice, capacity and token dropping, aux (GShard) and z losses.

Shape legend: T tokens (local), D hidden, E experts (all, global ids), K top-k, P = T*K (token, choice)
pairs, N kept pairs (P minus dropped).
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

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
    gates_TK: fp32 combine weights of every choice (differentiable; dropped pairs simply unused).
    expert_TK: chosen expert ids.
    aux_loss, z_loss: scalar fp32 tensors (not multiplied by any coefficient).
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


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, jitter: bool) -> torch.Tensor:
    """fp32 logits x·W_g whatever the model dtype (fp64 included, as DeepSpeed's TopKGate); `jitter` multiplies
    the router input by U(1-eps, 1+eps).

    Softmax over bf16 logits would make the expert choice and the aux loss noisy (Switch Transformer's
    "selective precision"); fp32 also for fp64 inputs so an fp64 model routes exactly as DeepSpeed.
    """
    x_TD = x_TD.float()
    if jitter:
        x_TD = x_TD * _uniform(1.0 - JITTER_EPS, 1.0 + JITTER_EPS, x_TD.shape, x_TD.device)
    return F.linear(x_TD, weight_ED.float())


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


def gshard_aux_loss(probs_TE: torch.Tensor, expert_TK: torch.Tensor, choices: str) -> torch.Tensor:
    """E · Σ_e mean_t(probs[t, e]) · frac_e (GShard / Switch load-balancing loss, DeepSpeed's l_aux).

    frac_e: the fraction of tokens whose FIRST choice is e ('first': DeepSpeed's top-1 and top-2), or of all
    T·k choices that go to e ('all': DeepSpeed's top-k for k > 2, = its mean(me·ce)·E²/k). Counted before dropping.
    """
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:  # a rank with no tokens gives 0, not NaN
        return probs_TE.new_zeros(())
    chosen = expert_TK[:, :1] if choices == "first" else expert_TK
    frac_E = expert_counts(chosen.reshape(-1), num_experts).to(probs_TE.dtype) / chosen.numel()
    return num_experts * torch.sum(probs_TE.mean(dim=0) * frac_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean_t(logsumexp(logits_t)^2); pushes logits toward small magnitudes."""
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)


class TopKRouter(nn.Module):
    """Linear fp32 router choosing k of E experts per token, with capacity-based dropping.

    Args: hidden_size D, num_experts E, k, train/eval capacity factors (switch with train()/eval()),
    min_capacity, drop_tokens (False = dropless), use_rts (random drop priority), noisy_gate_policy,
    compute_z_loss, init_method (fills the [E, D] weight in place; default: nn.Linear's init), and the routing
    choices of MoEConfig (drop_policy, renormalize, second_expert_sampling, rts_scope, aux_loss_choices).
    No communication: capacity uses the local token count T.
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int, train_capacity_factor: float,
                 eval_capacity_factor: float, min_capacity: int, drop_tokens: bool, use_rts: bool,
                 noisy_gate_policy: Optional[str], compute_z_loss: bool, init_method=None,
                 drop_policy: str = "probs", renormalize: str = "after_drop", second_expert_sampling: bool = True,
                 rts_scope: str = "top1", aux_loss_choices: str = "first"):
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.train_capacity_factor, self.eval_capacity_factor = train_capacity_factor, eval_capacity_factor
        self.min_capacity, self.drop_tokens, self.use_rts = min_capacity, drop_tokens, use_rts
        self.noisy_gate_policy, self.compute_z_loss = noisy_gate_policy, compute_z_loss
        self.drop_policy, self.renormalize, self.rts_scope = drop_policy, renormalize, rts_scope
        self.second_expert_sampling, self.aux_loss_choices = second_expert_sampling, aux_loss_choices
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        if init_method is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            with torch.no_grad():
                init_method(self.weight)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """Steps (DeepSpeed's TopKGate + top1/top2/topkgating order, so random draws line up):
        1. fp32 logits (input jitter in training with 'Jitter'); softmax;
        2. expert choice (Gumbel noise for 'RSample' top-1 in training, for top-2 second-expert sampling);
        3. capacity and drop priority (RTS uniforms over [T, E], or drop_policy), then slots;
        4. combine weights (renormalised over kept or all choices), aux and z losses.
        """
        noise = self.noisy_gate_policy if self.training else None
        logits_TE = router_logits(x_TD, self.weight, jitter=noise == "Jitter")
        probs_TE = torch.softmax(logits_TE, dim=1)
        expert_TK = choose_experts(logits_TE, probs_TE, self.k, gumbel_top1=noise == "RSample",
                                   second_expert_sampling=self.second_expert_sampling)
        num_tokens = x_TD.shape[0]
        capacity = priority_TK = None
        if self.drop_tokens:
            cf = self.train_capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(num_tokens, self.num_experts, self.k, cf, self.min_capacity)
            if self.use_rts and self.rts_scope == "top1" and self.k == 1:
                # DeepSpeed's top1gating: one uniform per (token, expert), in training and eval
                priority_TK = _uniform(0.0, 1.0, probs_TE.shape, x_TD.device).gather(1, expert_TK)
            elif self.use_rts and self.rts_scope == "train" and self.training:
                priority_TK = torch.rand(expert_TK.shape, device=x_TD.device)
            else:
                priority_TK = drop_priority(self.drop_policy, probs_TE, expert_TK, capacity)
        pair_idx_N, counts_E, routed_E = assign_slots(expert_TK, priority_TK, self.num_experts, capacity)
        gates_TK = combine_gates(probs_TE, expert_TK, pair_idx_N, self.renormalize)
        z_loss = router_z_loss(logits_TE) if self.compute_z_loss else logits_TE.new_zeros(())
        num_pairs = max(expert_TK.numel(), 1)
        return Routing(
            pair_idx_N=pair_idx_N, counts_E=counts_E, gates_TK=gates_TK, expert_TK=expert_TK,
            aux_loss=gshard_aux_loss(probs_TE, expert_TK, self.aux_loss_choices), z_loss=z_loss,
            tokens_per_expert_E=routed_E.detach(),
            dropped_fraction=1.0 - counts_E.sum().to(torch.float32) / num_pairs,
            capacity=capacity)
