"""Independent token-by-token reference for the MoE layer tests (plain loops, float64)."""
import math

import torch
import torch.nn.functional as F


def params_of(layer):
    """(router W [E, D], w1 [E, F, D], b1, w2 [E, D, F], b2) of a single-rank MoELayer with built-in experts."""
    ex = layer.experts
    return layer.router.weight, ex.w1_eFD, ex.b1_eF, ex.w2_eDF, ex.b2_eD


def expert_mlp(x_D, w1, b1, w2, b2, e):
    return F.gelu(x_D @ w1[e].t() + b1[e]) @ w2[e].t() + b2[e]


def route(x_TD, wg, k):
    """Per-token routing: (probs [T, E], list of chosen expert lists, list of gate lists)."""
    probs = torch.softmax(x_TD @ wg.t(), dim=-1)
    chosen, gates = [], []
    for t in range(x_TD.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda e: -float(probs[t, e].detach()))[:k]
        g = [probs[t, e] for e in order]
        if k >= 2:
            total = sum(g)
            g = [gi / total for gi in g]
        chosen.append(order)
        gates.append(g)
    return probs, chosen, gates


def kept_pairs(probs, chosen, capacity):
    """Set of kept (t, j) pairs: per expert the `capacity` pairs with the highest router probability."""
    if capacity is None:
        return {(t, j) for t in range(len(chosen)) for j in range(len(chosen[t]))}
    kept = set()
    for e in range(probs.shape[1]):
        pairs = [(t, j) for t in range(len(chosen)) for j in range(len(chosen[t])) if chosen[t][j] == e]
        pairs.sort(key=lambda tj: -float(probs[tj[0], e].detach()))
        kept.update(pairs[:capacity])
    return kept


def reference_moe(x_TD, wg, w1, b1, w2, b2, k, capacity=None):
    """y_t = Σ_{kept (t, j)} gate_tj · expert_{e_tj}(x_t), token by token."""
    probs, chosen, gates = route(x_TD, wg, k)
    kept = kept_pairs(probs, chosen, capacity)
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for j, e in enumerate(chosen[t]):
            if (t, j) in kept:
                y = y + gates[t][j] * expert_mlp(x_TD[t], w1, b1, w2, b2, e)
        rows.append(y)
    return torch.stack(rows), probs, chosen, kept


def capacity_formula(T, E, k, cf, min_capacity):
    return max(math.ceil(k * T / E * cf), min_capacity)
