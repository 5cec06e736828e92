"""Top-k router: fp32 logits, expert choice, capacity and token dropping, aux (GShard) and z losses.

Shape legend: T tokens (local), D hidden, E experts (all, global ids), K top-k, P = T*K (token, choice)
pairs, N kept pairs (P minus dropped).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

JITTER_EPS = 1e-2  # DeepSpeed's multiplicative_jitter range: x * U(1 - eps, 1 + eps)


class Routing(NamedTuple):
    """One router decision for T local tokens.

    pair_idx_N: kept (token, choice) pairs as flat indices t*K + k into [T, K], sorted by expert
        (stable, so within an expert by priority when dropping, by token otherwise).
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
    """C = max(ceil(k * T / E * cf), min_capacity) (DESIGN.md §3)."""
    return max(int(math.ceil(k * num_tokens / num_experts * capacity_factor)), min_capacity)


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, jitter: bool) -> torch.Tensor:
    """fp32 logits x·W_g (fp64 for fp64 inputs); `jitter` multiplies the router input by U(1-eps, 1+eps).

    The router runs in at least fp32 whatever the model dtype: softmax over bf16 logits would make
    the expert choice and the aux loss noisy (Switch Transformer's "selective precision").
    """
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    x_TD = x_TD.to(dtype)
    if jitter:
        x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - JITTER_EPS, 1.0 + JITTER_EPS)
    return F.linear(x_TD, weight_ED.to(dtype))


def select_topk(logits_TE: torch.Tensor, k: int, gumbel: bool):
    """Choose k experts per token; returns (probs_TE, expert_TK, gates_TK).

    Gates are the router probabilities of the chosen experts; for k >= 2 they are renormalised over the
    k choices (before any dropping, so a dropped choice does not enlarge the others). `gumbel`
    ('RSample') adds Gumbel noise to the logits for the choice only; gates use the clean probabilities.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    scores_TE = probs_TE
    if gumbel:
        u_TE = torch.rand_like(logits_TE).clamp_(1e-9, 1.0 - 1e-9)
        scores_TE = logits_TE - torch.log(-torch.log(u_TE))
    if k == 1:
        expert_TK = scores_TE.detach().argmax(dim=-1, keepdim=True)
    else:
        expert_TK = scores_TE.detach().topk(k, dim=-1, sorted=True).indices
    gates_TK = probs_TE.gather(1, expert_TK)
    if k >= 2:
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates_TK.dtype).eps)
    return probs_TE, expert_TK, gates_TK


def assign_slots(expert_TK: torch.Tensor, priority_TK: Optional[torch.Tensor], num_experts: int,
                 capacity: Optional[int]):
    """Sort pairs by expert and drop those beyond `capacity`; returns (pair_idx_N, counts_E, routed_E).

    With a capacity, each expert keeps its `capacity` highest-priority pairs: pairs are first ordered by
    priority (descending), then stably by expert, so the position within an expert's run is its rank.
    """
    expert_P = expert_TK.reshape(-1)
    routed_E = torch.bincount(expert_P, minlength=num_experts)
    if capacity is None:
        pair_idx_N = torch.argsort(expert_P, stable=True)
        return pair_idx_N, routed_E, routed_E
    by_priority_P = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)
    order_P = by_priority_P[torch.argsort(expert_P[by_priority_P], stable=True)]
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    rank_P = torch.arange(order_P.numel(), device=order_P.device) - starts_E[expert_P[order_P]]
    pair_idx_N = order_P[rank_P < capacity]
    return pair_idx_N, routed_E.clamp(max=capacity), routed_E


def gshard_aux_loss(probs_TE: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
    """E · Σ_e mean_t(probs[t, e]) · frac_e, with frac_e the fraction of tokens whose *top-1* choice is e.

    Top-1 fraction for every k, as DeepSpeed/GShard do for top-2 (counted before dropping).
    """
    num_tokens, num_experts = probs_TE.shape
    frac_E = torch.bincount(expert_TK[:, 0], minlength=num_experts).to(probs_TE.dtype) / max(num_tokens, 1)
    mean_probs_E = probs_TE.sum(dim=0) / max(num_tokens, 1)  # a rank with no tokens gives 0, not NaN
    return num_experts * torch.sum(mean_probs_E * frac_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean_t(logsumexp(logits_t)^2); pushes logits toward small magnitudes."""
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)


class TopKRouter(nn.Module):
    """Linear fp32 router choosing k of E experts per token, with capacity-based dropping.

    Args: hidden_size D, num_experts E, k, train/eval capacity factors (switch with train()/eval()),
    min_capacity, drop_tokens (False = dropless), use_rts (random drop priority), noisy_gate_policy,
    compute_z_loss, init_method (fills the [E, D] weight in place; default: nn.Linear's init).
    No communication: capacity uses the local token count T.
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int, train_capacity_factor: float,
                 eval_capacity_factor: float, min_capacity: int, drop_tokens: bool, use_rts: bool,
                 noisy_gate_policy: Optional[str], compute_z_loss: bool, init_method=None):
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.train_capacity_factor, self.eval_capacity_factor = train_capacity_factor, eval_capacity_factor
        self.min_capacity, self.drop_tokens, self.use_rts = min_capacity, drop_tokens, use_rts
        self.noisy_gate_policy, self.compute_z_loss = noisy_gate_policy, compute_z_loss
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        if init_method is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            with torch.no_grad():
                init_method(self.weight)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        noisy = self.training and self.noisy_gate_policy is not None
        logits_TE = router_logits(x_TD, self.weight, jitter=noisy and self.noisy_gate_policy == "Jitter")
        probs_TE, expert_TK, gates_TK = select_topk(logits_TE, self.k,
                                                    gumbel=noisy and self.noisy_gate_policy == "RSample")
        num_tokens = x_TD.shape[0]
        capacity = priority_TK = None
        if self.drop_tokens:
            cf = self.train_capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(num_tokens, self.num_experts, self.k, cf, self.min_capacity)
            # Priority = the choice's router probability (not the renormalised gate, which is not
            # comparable across tokens), or uniform random with RTS. RTS is a training regulariser: eval
            # uses probability priority so evaluation is deterministic and draws nothing from the RNG.
            priority_TK = (torch.rand_like(gates_TK) if self.use_rts and self.training
                           else probs_TE.detach().gather(1, expert_TK))
        pair_idx_N, counts_E, routed_E = assign_slots(expert_TK, priority_TK, self.num_experts, capacity)
        z_loss = router_z_loss(logits_TE) if self.compute_z_loss else logits_TE.new_zeros(())
        num_pairs = max(expert_TK.numel(), 1)
        return Routing(
            pair_idx_N=pair_idx_N, counts_E=counts_E, gates_TK=gates_TK, expert_TK=expert_TK,
            aux_loss=gshard_aux_loss(probs_TE, expert_TK), z_loss=z_loss,
            tokens_per_expert_E=routed_E.detach(),
            dropped_fraction=(1.0 - pair_idx_N.numel() / num_pairs) * torch.ones((), device=x_TD.device),
            capacity=capacity)
