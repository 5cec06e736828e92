"""Batched continuation log-likelihoods, scored like lm-evaluation-harness `_encode_pair` + `_loglikelihood_tokens`.

A request is (context tokens, continuation tokens). Its answer is (sum of log p(continuation token) given
everything before it, whether every continuation token is the argmax). How a request becomes model input
(harness `_loglikelihood_tokens`):

1. full = context + continuation; keep the last window + 1 tokens (left truncation); the model input is all
   but the last of those, so the input is at most `window` tokens.
2. The logits at the last len(continuation) input positions predict the continuation tokens; a continuation
   longer than the window is scored on its last `window` tokens, the ones predicted inside the kept window
   (`model_input`).

Batching: requests are grouped by their *padded length* (input length rounded up to `pad_multiple`, never
past the window), each group is cut into micro-batches, and rows are right-padded with token 0 to that length.
Causal attention keeps padding out of every real position. Because a request's input shape [*, padded length]
does not depend on which other requests share its micro-batch, its numbers are bit-identical at every
micro-batch size for a dense model (fp32 on CPU: checked in tests/unit/test_eval_scorer.py). Padding every
micro-batch to its own longest row (the harness's way) shifts logits in the last bits as the batch changes.
MoE: dropless layers match across micro-batch sizes to fp32 rounding only (an expert's GEMM has as many rows as
tokens routed to it); with token dropping, capacity counts every token of the micro-batch, padding included,
so results depend on the batch (as in DeepSpeed-MoE evaluation); evaluation is dropless unless asked.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One continuation to score: token ids of the context and of the continuation."""

    context: Tuple[int, ...]
    continuation: Tuple[int, ...]


class Answer(NamedTuple):
    loglikelihood: float  # sum over continuation tokens of log_softmax(logits)[token]
    is_greedy: bool  # every continuation token is the argmax of its logits


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Encode context and continuation together and split them, like the harness's `_encode_pair`.

    Trailing whitespace of the context moves onto the continuation; whole = tokenize(context + continuation),
    context ids = tokenize(context), continuation ids = whole[len(context ids):]. An empty context becomes the
    end-of-document token (the harness's convention, so the first continuation token has something to condition on),
    or, when the continuation starts with that token, its first token.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":  # the continuation without special tokens, after the prefix token unless it starts with it
        # (`prefix`, `tokenize_plain`: harness.HarnessEncoding's, where the harness's prefix_token_id is not the EOD)
        prefix = getattr(tokenizer, "prefix", tokenizer.eod)
        cont = getattr(tokenizer, "tokenize_plain", tokenizer.tokenize)(continuation)
        return Request((prefix,), tuple(cont)) if cont[:1] != [prefix] else Request(tuple(cont[:1]), tuple(cont[1:]))
    whole = tokenizer.tokenize(context + continuation)
    context_ids = tokenizer.tokenize(context)
    return Request(tuple(context_ids), tuple(whole[len(context_ids):]))


def model_input(request: Request, window: int) -> Tuple[List[int], List[int]]:
    """(input ids, scored continuation ids): input = (context + continuation)[-(window + 1):][:-1].

    The harness's left truncation: of context + continuation, the last window + 1 tokens are kept, the model reads
    all but the last of them, and every kept continuation token that has a prediction in that input is scored.
    For a continuation of at most `window` tokens that is all of it (the harness's `hf` backend, lm_eval 0.4.13,
    `HFLM._loglikelihood_tokens`). A longer continuation keeps its last `window` tokens: the harness asserts
    `len(continuation) <= max_length` there, and this is its answer for the request whose context also holds
    the continuation's earlier tokens (the same input window, the same scored positions).
    """
    if not request.context:
        raise ValueError("a request needs at least one context token (encode_pair puts the EOD token there)")
    full = list(request.context) + list(request.continuation)
    scored = list(request.continuation[-window:]) if request.continuation else []
    return full[-(window + 1):][:-1], scored


def padded_length(n: int, pad_multiple: int, window: int) -> int:
    return min(-(-n // pad_multiple) * pad_multiple, window)


def score_logits(logits_CV: torch.Tensor, continuation: Sequence[int], dtype: torch.dtype) -> Answer:
    """Answer from the logits at the continuation positions: logits_CV [C, V] -> (sum log p, all greedy)."""
    if len(continuation) == 0:  # the harness answers (0, True) for an empty continuation
        return Answer(0.0, True)
    logp_CV = F.log_softmax(logits_CV.to(dtype), dim=-1)
    target_C = torch.tensor(continuation, device=logits_CV.device)
    greedy = bool((logp_CV.argmax(dim=-1) == target_C).all())
    ll = logp_CV.gather(1, target_C.unsqueeze(1)).sum()
    return Answer(float(ll), greedy)


class LoglikelihoodScorer:
    """Scores requests in right-padded micro-batches with a causal LM.

    Args:
        model: GPTModel in eval mode (anything with `model(tokens [b, s]).logits [b, s, V]` also works, slower).
        window: most input tokens per request (the model's context length).
        micro_batch_size: requests per forward.
        pad_multiple: rows are padded to a multiple of this (capped at the window); 1 = group exact lengths.
        logprob_dtype: dtype of log_softmax (fp32, or fp64 for --eval-fp32 checks).
        autocast_dtype: torch.bfloat16/float16 to run the forward under autocast; None = model's own dtype.
    No communication: one process scores everything.

    Speed: the LM head (h x V per token) dominates a small model's cost, and only the continuation positions
    need logits (1-3 of ~100 tokens for LAMBADA). For a GPTModel the scorer therefore takes the final-LayerNorm
    output and applies the tied head to the continuation rows only, all rows of a micro-batch in one GEMM padded
    to a multiple of HEAD_ROWS rows: CPU GEMMs with fewer rows take a different kernel (matrix-vector), whose
    last bits differ, which would make results depend on the micro-batch size. A self-check at construction
    compares this path with the model's own logits.
    """

    HEAD_ROWS = 16

    def __init__(self, model, window: int, micro_batch_size: int = 8, pad_multiple: int = 16,
                 logprob_dtype: torch.dtype = torch.float32, autocast_dtype: Optional[torch.dtype] = None,
                 layer_major_block: int = 1):
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size ({micro_batch_size}) must be >= 1")
        if pad_multiple < 1:
            raise ValueError(f"--pad-to-multiple ({pad_multiple}) must be >= 1")
        if window < 1:
            raise ValueError(f"--seq-length ({window}) must be >= 1")
        self.model = model
        self.window = window
        self.micro_batch_size = micro_batch_size
        self.pad_multiple = pad_multiple
        self.logprob_dtype = logprob_dtype
        self.autocast_dtype = autocast_dtype
        # > 1: run that many micro-batches layer by layer (GPTModel.forward_layer_major), so an offloaded
        # expert is read once per block; the numbers are those of the one-at-a-time order
        self.layer_major_block = max(1, int(layer_major_block))
        self.device = next(model.parameters()).device
        self.tied_head = hasattr(model, "final_layernorm") and hasattr(model, "word_embeddings")
        if self.tied_head:
            self._check_tied_head()

    def micro_batches(self, inputs: List[List[int]]) -> List[List[int]]:
        """Indices of each micro-batch: longest padded length first (memory peaks early), one padded length each."""
        order = sorted(range(len(inputs)),
                       key=lambda i: (-padded_length(len(inputs[i]), self.pad_multiple, self.window), i))
        batches: List[List[int]] = []
        for i in order:
            length = padded_length(len(inputs[i]), self.pad_multiple, self.window)
            last = batches[-1] if batches else None
            if (last is None or len(last) == self.micro_batch_size
                    or padded_length(len(inputs[last[0]]), self.pad_multiple, self.window) != length):
                batches.append([i])
            else:
                last.append(i)
        return batches

    @torch.no_grad()
    def score(self, requests: Sequence[Request], progress: Optional[Callable[[int], None]] = None) -> List[Answer]:
        """Answers in the order of `requests`; `progress(n)` is called after each micro-batch of n requests."""
        prepared = [model_input(r, self.window) for r in requests]
        inputs = [p[0] for p in prepared]
        answers: List[Optional[Answer]] = [None] * len(requests)
        batches = self.micro_batches(inputs)
        block = self.layer_major_block if self.tied_head and hasattr(self.model, "forward_layer_major") else 1
        for start in range(0, len(batches), block):
            group = batches[start:start + block]
            made = [self._batch_tokens(batch, inputs, prepared) for batch in group]
            if block > 1:
                with self._autocast():
                    hiddens = self.model.forward_layer_major([tokens for tokens, _ in made])
            for j, (batch, (tokens, spans)) in enumerate(zip(group, made)):
                hidden = hiddens[j] if block > 1 else None
                logits = self.continuation_logits(tokens, spans, hidden=hidden)
                for i, logits_CV in zip(batch, logits):
                    answers[i] = score_logits(logits_CV, prepared[i][1], self.logprob_dtype)
                if progress is not None:
                    progress(len(batch))
        return answers  # type: ignore[return-value]

    def _batch_tokens(self, batch: List[int], inputs, prepared):
        """(tokens [b, s] right-padded with id 0 on the model's device, continuation spans (row, start, end))."""
        length = padded_length(len(inputs[batch[0]]), self.pad_multiple, self.window)
        tokens = torch.zeros(len(batch), length, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, :len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        spans = [(row, len(inputs[i]) - len(prepared[i][1]), len(inputs[i])) for row, i in enumerate(batch)]
        return tokens.to(self.device), spans

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                else contextlib.nullcontext())

    def continuation_logits(self, tokens: torch.Tensor, spans: Sequence[Tuple[int, int, int]],
                            hidden: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """tokens [b, s]; spans (row, start, end) -> logits [end - start, V] of each span, in order.

        `hidden`: the final-LayerNorm output [b, s, h] when already computed (layer-major blocks)."""
        with self._autocast():
            if not self.tied_head:
                logits = self.model(tokens).logits  # [b, s, V]
                return [logits[row, start:end] for row, start, end in spans]
            if hidden is None:
                hidden = self._final_hidden(tokens)  # [b, s, h]
            rows = torch.cat([hidden[row, start:end] for row, start, end in spans])  # [N, h]
            n = rows.shape[0]
            pad = -(-max(n, 1) // self.HEAD_ROWS) * self.HEAD_ROWS - n
            rows = F.pad(rows, (0, 0, 0, pad))  # [N + pad, h]: a GEMM shape that keeps rows independent
            logits = F.linear(rows, self._head_weight())[:n]  # [N, V]
        return list(torch.split(logits, [end - start for _, start, end in spans]))

    def _final_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Output of the model's final LayerNorm [b, s, h], without computing logits."""
        captured = []
        handle = self.model.final_layernorm.register_forward_hook(lambda mod, inp, out: captured.append(out))
        try:
            self.model(tokens, return_logits=False)
        finally:
            handle.remove()
        return captured[0]

    def _head_weight(self) -> torch.Tensor:
        """The LM head [V, h]: the word embedding, or an untied output layer (imported Qwen/Mixtral/... models)."""
        w = getattr(self.model, "output_weight", None)
        return w if isinstance(w, torch.Tensor) else self.model.word_embeddings.weight

    @torch.no_grad()
    def _check_tied_head(self) -> None:
        """The head-on-selected-rows path must reproduce the model's logits (guards against an untied head)."""
        n = min(8, self.window)
        vocab = self._head_weight().shape[0]
        tokens = (torch.arange(n, device=self.device) * 7919 % vocab).unsqueeze(0)  # [1, n]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # same draws in both passes (MoE random token selection)
            torch.manual_seed(0)
            ref = self.model(tokens).logits[0].float()  # [n, V]
            torch.manual_seed(0)
            hidden = self._final_hidden(tokens)[0]
        mine = F.linear(hidden, self._head_weight()).float()
        if ref.shape != mine.shape or not torch.allclose(ref, mine, rtol=1e-3, atol=1e-3):
            logger.warning("the model's logits are not final_layernorm output x word_embeddings; scoring with "
                           "full logits (slower)")
            self.tied_head = False
