"""Speculative expert prefetch for decoding: the next MoE layer's router, applied to the current hidden state,
names the experts to start reading (Eliseev & Mazur, "Fast Inference of Mixture-of-Experts Language Models
with Offloading", 2023), and the recall/precision of those guesses against the layer's true choices.

Shape legend: T tokens, D hidden, E experts, K top-k.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from moe.gating import router_logits


class GatePrefetcher:
    """Predicts MoE layer m's experts twice before m runs and prefetches them: after the attention of the block
    before m (early), and at m's block input (refined).

    Args:
        cache: the ExpertCache to prefetch into (this object registers itself as cache.prefetcher).
        predictors: {MoE layer m: (norm, router weight [E, D], k)}: the norm applied to m's input (its
            post-attention LayerNorm) and m's router; the guess is the top-k experts of router(norm(h)) for
            every token of the hidden state h handed to `after_attention`.
    Protocol (called by the model): `after_attention(m, h, defer)` records a guess for layer m; with
    defer=False (the current block is dense) it is issued at once, with defer=True (the current block is
    itself a MoE layer) it waits for `flush()`, which the cache calls once the current layer's experts are
    pinned, so a prefetch never competes with what the running layer needs. `before_block(m, h)` adds the
    refined guess. `observe(m, experts)` (from the cache) scores the union of both guesses against m's true
    expert set (recall: true experts guessed / true experts; precision: guessed experts used / guessed).
    """

    def __init__(self, cache, predictors: Dict[int, Tuple[Callable, torch.Tensor, int]]):
        self.cache = cache
        self.predictors = predictors
        self.pending: Optional[Tuple[int, List[int]]] = None
        self.guesses: Dict[int, Set[int]] = {}
        self.true_positives = self.predicted = self.actual = 0
        self.log: List[Tuple[int, Tuple[int, ...], Tuple[int, ...]]] = []  # (layer, guessed, true)
        cache.prefetcher = self

    def _guess(self, moe_layer: int, h: torch.Tensor) -> List[int]:
        norm, weight_ED, k = self.predictors[moe_layer]
        x_TD = norm(h).reshape(-1, weight_ED.shape[1])
        logits_TE = router_logits(x_TD, weight_ED, jitter=False)
        return sorted(set(logits_TE.topk(k, dim=-1).indices.reshape(-1).tolist()))

    @torch.no_grad()
    def after_attention(self, moe_layer: int, h: torch.Tensor, defer: bool) -> None:
        """Early guess (the most lead time): h is the residual stream after the previous block's attention."""
        guess = self._guess(moe_layer, h)
        self.guesses[moe_layer] = set(guess)
        self.pending = (moe_layer, guess)
        if not defer:
            self.flush()

    @torch.no_grad()
    def before_block(self, moe_layer: int, h: torch.Tensor) -> None:
        """Second guess at the MoE block's own input (the previous block's MLP has run: closer to the router's
        true input, less lead time); experts not guessed before are prefetched too."""
        self.flush()
        guess = self._guess(moe_layer, h)
        known = self.guesses.setdefault(moe_layer, set())
        new = [e for e in guess if e not in known]
        known.update(new)
        self.cache.prefetch((moe_layer, e) for e in new)

    def flush(self) -> None:
        if self.pending is not None:
            layer, guess = self.pending
            self.pending = None
            self.cache.prefetch((layer, e) for e in guess)

    def observe(self, moe_layer: int, experts: Sequence[int]) -> None:
        guess = self.guesses.pop(moe_layer, None)
        if guess is None:
            return
        true = set(experts)
        self.true_positives += len(guess & true)
        self.predicted += len(guess)
        self.actual += len(true)
        self.log.append((moe_layer, tuple(sorted(guess)), tuple(sorted(true))))

    def summary(self) -> dict:
        return {"prefetch_recall": self.true_positives / self.actual if self.actual else None,
                "prefetch_precision": self.true_positives / self.predicted if self.predicted else None,
                "prefetch_guesses": len(self.log)}
