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
    "megatron.pipeline": ["megatron.training", "megatron.arguments", "megatron.checkpointing", "megatron.data",
                          "megatron.eval", "megatron.optimizer"],
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


def _edges(mod, path, known):
    """The modules of `known` that `mod` imports anywhere in its file (top level, inside functions, under
    TYPE_CHECKING): `from P import name` counts as importing P.name when that is a module, else P. A submodule
    import is not counted as importing its parent packages (their __init__ runs, but re-exports there would make
    every package with an __init__ that names its parts look cyclic)."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        out |= {n for n in names if n in known and n != mod}
    return out


def _cycles(graph):
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """STYLE.md §2: no import cycles among megatron/ and moe/ modules, function-level and TYPE_CHECKING imports
    included (a lazy import hides a cycle from Python, not from a reader)."""
    mods = dict(_modules())
    graph = {m: _edges(m, p, mods) for m, p in mods.items()}
    assert not _cycles(graph), "\n".join(" <-> ".join(c) for c in _cycles(graph))


def test_cycle_finder_sees_a_function_level_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


IO_MODULES = ("os", "io", "json", "pathlib", "shutil", "subprocess", "tempfile", "pickle", "socket", "glob",
              "urllib", "logging", "sys", "torch", "numpy")


def test_config_module_does_no_io():
    """megatron/config.py holds frozen dataclasses and their checks: no file, process, network or tensor I/O (the
    flags are read in arguments.py, files in their own modules), so a config can be built and checked anywhere."""
    bad = [imp for imp in _imports(os.path.join(ROOT, "megatron", "config.py"))
           if any(imp == m or imp.startswith(m + ".") for m in IO_MODULES)]
    assert not bad, bad
