"""STYLE.md §2 dependency direction, checked on the AST of every module (the rule list lives here)."""
import ast
import os

from tests.conftest import ROOT

# package prefix -> module prefixes it must never import
FORBIDDEN = {
    "moe": ["megatron.training", "megatron.arguments", "megatron.checkpointing", "megatron.model",
            "megatron.data", "megatron.eval", "megatron.inference", "megatron.distillation"],
    "megatron.data": ["megatron.model", "megatron.training", "megatron.arguments", "megatron.checkpointing",
                      "megatron.optimizer", "megatron.eval", "moe"],
    "megatron.tokenizer": ["megatron.model", "megatron.training", "megatron.arguments", "megatron.data",
                           "megatron.checkpointing", "megatron.optimizer", "megatron.eval", "moe"],
    "megatron.model": ["megatron.training", "megatron.arguments", "megatron.checkpointing", "megatron.data",
                       "megatron.eval", "megatron.optimizer"],
    "megatron.parallel_state": ["megatron.model", "megatron.training", "moe"],
    "megatron.tensor_parallel": ["megatron.model", "megatron.training", "megatron.arguments", "megatron.checkpointing",
                                "megatron.data", "megatron.optimizer", "megatron.eval", "moe"],
    "megatron.checkpoint_tp": ["megatron.training", "megatron.arguments", "megatron.eval"],
    "megatron.optimizer": ["megatron.training", "megatron.arguments", "megatron.eval"],
    "megatron.checkpointing": ["megatron.training", "megatron.arguments", "megatron.eval"],
    "megatron.eval": ["megatron.training", "megatron.arguments"],
}


def _modules():
    for pkg in ("megatron", "moe"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield rel.removesuffix(".__init__"), path


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for a in node.names:
                yield f"{node.module}.{a.name}"


def test_no_forbidden_imports():
    bad = []
    for mod, path in _modules():
        rules = [r for prefix, r in FORBIDDEN.items() if mod == prefix or mod.startswith(prefix + ".")]
        for imp in _imports(path):
            for rule in rules:
                for target in rule:
                    if imp == target or imp.startswith(target + "."):
                        bad.append(f"{mod} imports {imp}")
    assert not bad, "\n".join(sorted(set(bad)))
