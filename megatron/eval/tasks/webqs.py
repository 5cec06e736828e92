"""WebQuestions (test, the harness's `webqs`): Freebase questions, exact match by greedy decoding of an answer."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from megatron.eval.scorer import Answer
from megatron.eval.tasks.base import Task, field, read_records, register_task


def remove_prefixes(aliases: Sequence[str]) -> List[str]:
    """Sorted aliases without any that has a strict prefix among them (lm_eval/tasks/webqs/utils.py): if the prefix
    is greedy-decoded, the longer alias cannot add a match."""
    ordered = sorted(aliases)
    out = [ordered[0]]
    for alias in ordered[1:]:
        if not alias.startswith(out[-1]):
            out.append(alias)
    return out


@register_task
class WebQs(Task):
    """Context "Question: {question}\\nAnswer:", one continuation " {alias}" per answer alias (prefix-reduced);
    exact_match = some alias is entirely greedy-decoded (the harness's multiple-choice exact_match over all golds).
    """

    name = "webqs"
    data_files = ("webqs-test",)
    aggregations = {"exact_match": "mean"}
    higher_is_better = {"exact_match": True}

    def load_docs(self, paths: Dict[str, Path]) -> List[dict]:
        path = paths["webqs-test"]
        return [{"question": field(path, i, rec, "question"), "answers": list(field(path, i, rec, "answers"))}
                for i, rec in enumerate(read_records(path, columns=("question", "answers")))]

    def requests(self, doc: dict) -> List[Tuple[str, str]]:
        context = f"Question: {doc['question']}\nAnswer:"
        return [(context, " " + alias) for alias in remove_prefixes(doc["answers"])]

    def process_results(self, doc: dict, answers: Sequence[Answer]) -> Dict[str, float]:
        return {"exact_match": float(any(a.is_greedy for a in answers))}
