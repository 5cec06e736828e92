"""RACE-high (test, the harness's `race`): reading comprehension, the last question of each article."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron.errors import DataError
from megatron.eval.scorer import Answer
from megatron.eval.tasks.base import Task, field, read_records, register_task

_LETTER = {"A": 0, "B": 1, "C": 2, "D": 3}


@register_task
class RaceHigh(Task):
    """One document per article (EleutherAI/race: `article` and `problems`, a Python-literal list of
    {question, options, answer}), scored like lm_eval/tasks/race/preprocess_race.py:

    context = "Article: {article}\\n\\n" + every earlier problem with its answer filled in ("Question: q\\nAnswer:
    a\\n", or for a cloze question ending "  _  ." the question with the blank replaced) + the last question;
    continuations " {option}" for its four options; acc = argmax of the summed log-likelihoods is the answer.
    """

    name = "race"
    data_files = ("race-high-test",)
    aggregations = {"acc": "mean"}
    higher_is_better = {"acc": True}

    def load_docs(self, paths: Dict[str, Path]) -> List[dict]:
        path = paths["race-high-test"]
        docs = []
        for i, rec in enumerate(read_records(path)):
            problems = field(path, i, rec, "problems")
            try:
                problems = ast.literal_eval(problems) if isinstance(problems, str) else list(problems)
                for p in problems:
                    _ = p["question"], p["options"][3], _LETTER[p["answer"]]
            except (ValueError, SyntaxError, KeyError, IndexError, TypeError) as e:
                raise DataError(f"{path}: record {i + 1}: `problems` is not a list of {{question, options (4), "
                                f"answer A-D}} ({e!r})") from None
            docs.append({"article": field(path, i, rec, "article"), "problems": problems})
        return docs

    @staticmethod
    def _answer(problem: dict) -> str:
        return problem["options"][_LETTER[problem["answer"]]]

    def requests(self, doc: dict) -> List[Tuple[str, str]]:
        text = "Article: " + doc["article"] + "\n\n"
        for problem in doc["problems"][:-1]:
            if problem["question"][-6:] == "  _  .":
                text += problem["question"][:-5] + self._answer(problem) + "\n"
            else:
                text += "Question: " + problem["question"] + "\n" + "Answer: " + self._answer(problem) + "\n"
        last = doc["problems"][-1]
        text += last["question"]
        return [(text, " " + option) for option in last["options"][:4]]

    def process_results(self, doc: dict, answers: Sequence[Answer]) -> Dict[str, float]:
        gold = _LETTER[doc["problems"][-1]["answer"]]
        return {"acc": float(int(np.argmax([a.loglikelihood for a in answers])) == gold)}
