"""BoolQ (SuperGLUE validation, the harness's `boolq`): answer a yes/no question about a passage."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from megatron.eval.scorer import Answer
from megatron.eval.tasks.base import Task, field, read_records, register_task


@register_task
class BoolQ(Task):
    """Context "{passage}\\nQuestion: {question}?\\nAnswer:", continuations " no" and " yes" (label 1 = yes).

    acc = the more likely answer is the gold one (ties go to "no", np.argmax as in the harness). Reads the
    harness's parquet (fields passage, question, label) or Google's dev.jsonl (boolean field `answer`).
    """

    name = "boolq"
    data_files = ("boolq-validation",)
    aggregations = {"acc": "mean"}
    higher_is_better = {"acc": True}

    def load_docs(self, paths: Dict[str, Path]) -> List[dict]:
        path = paths["boolq-validation"]
        docs = []
        for i, rec in enumerate(read_records(path)):
            label = int(rec["label"]) if "label" in rec else int(bool(field(path, i, rec, "answer")))
            docs.append({"passage": field(path, i, rec, "passage"), "question": field(path, i, rec, "question"),
                         "gold": label})
        return docs

    def requests(self, doc: dict) -> List[Tuple[str, str]]:
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        return [(context, " no"), (context, " yes")]

    def process_results(self, doc: dict, answers: Sequence[Answer]) -> Dict[str, float]:
        no, yes = (a.loglikelihood for a in answers)
        return {"acc": float(int(yes > no) == doc["gold"])}
