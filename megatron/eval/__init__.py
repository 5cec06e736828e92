"""Zero-shot evaluation (LAMBADA, PIQA, ...) scored exactly like lm-evaluation-harness (DESIGN.md §7)."""
from megatron.eval.runner import EvalConfig, evaluate_task, markdown_table, run_zeroshot
from megatron.eval.scorer import Answer, LoglikelihoodScorer, Request, encode_pair
from megatron.eval.tasks import TASK_REGISTRY, Task, build_task, register_task

__all__ = ["Answer", "EvalConfig", "LoglikelihoodScorer", "Request", "TASK_REGISTRY", "Task", "build_task",
           "encode_pair", "evaluate_task", "markdown_table", "register_task", "run_zeroshot"]
