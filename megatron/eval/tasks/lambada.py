"""LAMBADA (OpenAI detokenized test set, the harness's `lambada_openai`): predict the last word of a passage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from megatron.errors import DataError
from megatron.eval.scorer import Answer, Request
from megatron.eval.tasks.base import Task, register_task


@register_task
class Lambada(Task):
    """Context = the text up to its last space-separated word; target = " " + that word.

    acc = every target token is greedy-correct; ppl = exp(mean over examples of the target's summed NLL).

    Args:
        last_token: Megatron-LM's non-strict variant instead: tokenize the whole text and score only its last
            BPE token (published Megatron numbers use either; the harness default is the whole word).
    """

    name = "lambada"
    data_files = ("lambada",)
    aggregations = {"acc": "mean", "ppl": "perplexity"}
    higher_is_better = {"acc": True, "ppl": False}

    def __init__(self, last_token: bool = False):
        self.last_token = last_token

    def load_docs(self, paths: Dict[str, Path]) -> List[dict]:
        path = paths["lambada"]
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append({"text": json.loads(line)["text"]})
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{lineno}: not a LAMBADA record with a 'text' field ({e})") from None
        return docs

    def requests(self, doc: dict) -> List[Tuple[str, str]]:
        # split(' ') on purpose, not split(): the harness splits on single spaces, so a newline inside the last
        # "word" stays part of it, exactly as in lambada_openai.
        context, _, word = doc["text"].rpartition(" ")
        return [(context, " " + word)]

    def encode(self, doc: dict, tokenizer) -> List[Request]:
        if not self.last_token:
            return super().encode(doc, tokenizer)
        ids = tokenizer.tokenize(doc["text"])
        return [Request(tuple(ids[:-1]) or (tokenizer.eod,), tuple(ids[-1:]))]

    def process_results(self, doc: dict, answers: Sequence[Answer]) -> Dict[str, float]:
        (ans,) = answers
        return {"acc": float(ans.is_greedy), "ppl": ans.loglikelihood}

    def describe(self) -> str:
        return "last BPE token" if self.last_token else "whole last word"
