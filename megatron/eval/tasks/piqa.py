"""PIQA (physical commonsense, validation split): pick the better of two solutions to a goal."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron.errors import DataError
from megatron.eval.scorer import Answer
from megatron.eval.tasks.base import Task, register_task


@register_task
class Piqa(Task):
    """Context "Question: {goal}\\nAnswer:", continuations " {sol1}" and " {sol2}".

    acc = argmax of the summed log-likelihoods; acc_norm = argmax of log-likelihood / len(solution) in
    characters, where the length is that of the solution text without the leading space (the harness divides
    by len(choice), and the space is its target delimiter, not part of the choice). Ties go to the first
    solution (np.argmax), as in the harness.
    """

    name = "piqa"
    data_files = ("piqa-valid", "piqa-valid-labels")
    aggregations = {"acc": "mean", "acc_norm": "mean"}
    higher_is_better = {"acc": True, "acc_norm": True}

    def load_docs(self, paths: Dict[str, Path]) -> List[dict]:
        qpath, lpath = paths["piqa-valid"], paths["piqa-valid-labels"]
        with open(qpath, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        with open(lpath, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
        if len(lines) != len(labels):
            raise DataError(f"{qpath} has {len(lines)} questions but {lpath} has {len(labels)} labels")
        docs = []
        for lineno, (line, label) in enumerate(zip(lines, labels), 1):
            try:
                rec = json.loads(line)
                doc = {"goal": rec["goal"], "choices": [rec["sol1"], rec["sol2"]], "gold": int(label)}
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{qpath}:{lineno}: not a PIQA record with goal/sol1/sol2 and a 0/1 label "
                                 f"({e})") from None
            if doc["gold"] not in (0, 1):
                raise DataError(f"{lpath}:{lineno}: label {label!r} is not 0 or 1")
            docs.append(doc)
        return docs

    def requests(self, doc: dict) -> List[Tuple[str, str]]:
        context = f"Question: {doc['goal']}\nAnswer:"
        return [(context, " " + choice) for choice in doc["choices"]]

    def process_results(self, doc: dict, answers: Sequence[Answer]) -> Dict[str, float]:
        lls = np.array([a.loglikelihood for a in answers], dtype=np.float64)
        lengths = np.array([float(len(c)) for c in doc["choices"]])
        return {"acc": float(int(np.argmax(lls)) == doc["gold"]),
                "acc_norm": float(int(np.argmax(lls / lengths)) == doc["gold"])}
