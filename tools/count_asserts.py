"""Count test functions and `assert` statements under tests/ (AST, not grep): the before/after check that a
test-suite refactor lost no test or assertion.

Usage: python tools/count_asserts.py [tests_dir] [--per-file]
Counts `assert` statements, `pytest.raises`/`pytest.warns` uses, `torch.testing.assert_close`-style calls
(any call whose name starts with `assert`) and `def test_*` functions, per file and in total.
"""
import ast
import os
import sys


def count_file(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    c = {"tests": 0, "assert": 0, "assert_calls": 0, "raises": 0}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            c["tests"] += 1
        elif isinstance(node, ast.Assert):
            c["assert"] += 1
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("raises", "warns"):
                c["raises"] += 1
            elif name.startswith("assert"):
                c["assert_calls"] += 1
    return c


def main(argv):
    root = next((a for a in argv if not a.startswith("--")), "tests")
    per_file = "--per-file" in argv
    total = {"tests": 0, "assert": 0, "assert_calls": 0, "raises": 0}
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                c = count_file(os.path.join(d, f))
                for k in total:
                    total[k] += c[k]
                if per_file:
                    print(f"{os.path.join(d, f)}: " + " ".join(f"{k}={v}" for k, v in c.items()))
    print("TOTAL: " + " ".join(f"{k}={v}" for k, v in total.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
