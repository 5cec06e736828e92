"""TriviaQA (rc.nocontext validation, the harness's `triviaqa`): closed-book answers by greedy generation."""
from __future__ import annotations

import string
from pathlib import Path
from typing import Dict, List

from megatron.eval.tasks.base import GenerationTask, field, read_records, register_task

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """The harness's exact_match with ignore_case and ignore_punctuation: lower-case, ASCII punctuation removed."""
    return text.lower().translate(_NO_PUNCTUATION)


@register_task
class TriviaQA(GenerationTask):
    """Prompt "Question: {question}?\\nAnswer:"; greedy generation stops at "\\n", "." or "," (the yaml's `until`)
    or the end-of-document token, at most 256 tokens; the answer is the generation with surrounding whitespace
    stripped (filter remove_whitespace, take_first); exact_match = it equals some alias after normalize().
    """

    name = "triviaqa"
    data_files = ("triviaqa-validation",)
    aggregations = {"exact_match": "mean"}
    higher_is_better = {"exact_match": True}
    until = ("\n", ".", ",")

    def load_docs(self, paths: Dict[str, Path]) -> List[dict]:
        path = paths["triviaqa-validation"]
        docs = []
        for i, rec in enumerate(read_records(path, columns=("question", "answer"))):
            answer = field(path, i, rec, "answer")
            docs.append({"question": field(path, i, rec, "question"),
                         "aliases": list(field(path, i, answer, "aliases"))})
        return docs

    def prompt(self, doc: dict) -> str:
        return f"Question: {doc['question']}?\nAnswer:"

    def score_generation(self, doc: dict, text: str) -> Dict[str, float]:
        pred = normalize(text.strip())
        return {"exact_match": float(any(pred == normalize(alias) for alias in doc["aliases"]))}
