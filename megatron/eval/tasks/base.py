"""The zero-shot task interface: data files a task reads, requests per document, how answers become metrics.

A new task (BoolQ, RACE, TriviaQA, WebQs, ...) is one module in this package with one `Task` subclass decorated
with `@register_task`. Every task the paper reports reduces to log-likelihood requests: multiple choice compares
the choices' log-likelihoods (PIQA, BoolQ, RACE), and the harness scores TriviaQA/WebQs as "some answer alias is
greedy-decoded" (`any(is_greedy)` over the aliases).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Dict, List, Sequence, Tuple, Type

from megatron.eval.scorer import Answer, Request, encode_pair

TASK_REGISTRY: Dict[str, Type["Task"]] = {}


def register_task(cls: Type["Task"]) -> Type["Task"]:
    """Class decorator: makes the task available to --tasks under `cls.name`."""
    if cls.name in TASK_REGISTRY and TASK_REGISTRY[cls.name] is not cls:
        raise ValueError(f"two zero-shot tasks are named {cls.name!r}")
    TASK_REGISTRY[cls.name] = cls
    return cls


class Task(ABC):
    """One zero-shot task.

    Class attributes:
        name: the --tasks spelling.
        data_files: registry names in megatron.data.data_files (hash-checked before anything else runs).
        aggregations: metric -> "mean" or "perplexity" (see megatron.eval.metrics.AGGREGATIONS).
        higher_is_better: metric -> bool, for the printed table.
    """

    name: ClassVar[str]
    data_files: ClassVar[Tuple[str, ...]]
    aggregations: ClassVar[Dict[str, str]]
    higher_is_better: ClassVar[Dict[str, bool]]

    @abstractmethod
    def load_docs(self, paths: Dict[str, Path]) -> List[dict]:
        """Documents from the verified files; `paths` maps each name in `data_files` to its path."""

    @abstractmethod
    def requests(self, doc: dict) -> List[Tuple[str, str]]:
        """(context, continuation) strings this document asks to score."""

    @abstractmethod
    def process_results(self, doc: dict, answers: Sequence[Answer]) -> Dict[str, float]:
        """Per-document metric values from the answers to `requests(doc)`, in the same order."""

    def encode(self, doc: dict, tokenizer) -> List[Request]:
        """Token requests for `doc`; by default the harness's joint encoding of each (context, continuation)."""
        return [encode_pair(tokenizer, ctx, cont) for ctx, cont in self.requests(doc)]

    def describe(self) -> str:
        """Variant shown next to the task name in the results (e.g. how LAMBADA's target is chosen)."""
        return ""
