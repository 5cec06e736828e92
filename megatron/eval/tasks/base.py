"""The zero-shot task interface: data files a task reads, requests per document, how answers become metrics.

A new task is one module in this package with one `Task` subclass decorated with `@register_task`. Multiple choice
compares the choices' log-likelihoods (PIQA, BoolQ, RACE); WebQs (harness 0.4) scores "some answer alias is
greedy-decoded" (`any(is_greedy)` over the aliases); TriviaQA (harness 0.4) is a `GenerationTask`: greedy
generation up to a stop sequence, then exact match against the aliases.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
import json
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from megatron.errors import DataError
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


class GenerationTask(Task):
    """A task answered by generated text (the harness's `generate_until`): one prompt per document.

    Class attributes: `until` (stop sequences; the end-of-document string is always one too) and `max_gen_toks`
    (the harness's HF model default, 256, when the task's yaml sets none).
    """

    until: ClassVar[Tuple[str, ...]]
    max_gen_toks: ClassVar[int] = 256

    def requests(self, doc: dict) -> List[Tuple[str, str]]:
        return []  # no log-likelihood requests

    def process_results(self, doc: dict, answers: Sequence[Answer]) -> Dict[str, float]:
        raise TypeError(f"{self.name} is scored from generated text (score_generation), not log-likelihoods")

    @abstractmethod
    def prompt(self, doc: dict) -> str:
        """The context the answer is generated after."""

    @abstractmethod
    def score_generation(self, doc: dict, text: str) -> Dict[str, float]:
        """Per-document metric values from the generated text (already cut at the first stop sequence)."""


def read_records(path: Path, columns: Optional[Sequence[str]] = None) -> List[dict]:
    """Rows of a .jsonl (one JSON object a line) or .parquet file (only `columns` when given) as dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=list(columns) if columns else None).to_pylist()
        except Exception as e:  # pyarrow raises its own types for a damaged file or a missing column
            raise DataError(f"{path}: not a readable parquet file with columns {list(columns or [])} ({e}); "
                            f"run `python tools/download_data.py` to fetch it again") from None
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON line ({e})") from None
    return rows


def field(path: Path, i: int, rec: dict, key: str):
    """rec[key], or a DataError naming the file and record when the field is missing."""
    try:
        return rec[key]
    except (KeyError, TypeError):
        raise DataError(f"{path}: record {i + 1} has no {key!r} field; is this the file tools/download_data.py "
                        f"fetches?") from None
