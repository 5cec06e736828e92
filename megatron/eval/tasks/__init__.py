"""Zero-shot tasks: importing this package imports every module in it, so each task registers itself."""
import importlib
import pkgutil

from megatron.errors import ConfigError
from megatron.eval.tasks.base import TASK_REGISTRY, Task, register_task

# One file per task: any module dropped into this package is picked up here, no list to edit.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def build_task(name: str, **options) -> Task:
    """The task registered as `name`, constructed with `options`; ValueError naming --tasks when unknown."""
    if name not in TASK_REGISTRY:
        raise ConfigError(f"--tasks: unknown task {name!r}; known tasks: {', '.join(sorted(TASK_REGISTRY))}")
    return TASK_REGISTRY[name](**options)


__all__ = ["TASK_REGISTRY", "Task", "build_task", "register_task"]
