"""`run_cli`: run a command-line entry point's `main(argv)` inside the test process and return what a subprocess
would have given (exit code, stdout, stderr), without paying a Python+torch start-up per call.

Kept as subprocesses elsewhere: tests whose point is a signal, a kill, the interpreter's own exit code or a fresh
process (one exit-code smoke test per CLI in tests/cli/)."""
import contextlib
import importlib
import io
import logging
import os
from dataclasses import dataclass
from typing import Optional

# script path (as a user types it) -> module whose main(argv) it runs
_ENTRY_POINTS = {"pretrain_gpt.py": "megatron.training"}


@dataclass
class CliResult:
    """The fields of subprocess.CompletedProcess that the tests read."""
    returncode: int
    stdout: str
    stderr: str


def _module_for(script: str) -> str:
    script = script.replace(os.sep, "/")
    if script in _ENTRY_POINTS:
        return _ENTRY_POINTS[script]
    assert script.endswith(".py"), script
    return script[:-3].replace("/", ".")  # tools/generate.py -> tools.generate


@contextlib.contextmanager
def _env(extra: Optional[dict]):
    saved = {k: os.environ.get(k) for k in (extra or {})}
    os.environ.update(extra or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cli(script: str, argv, env: Optional[dict] = None) -> CliResult:
    """Call `script`'s main(argv) in-process. stdout/stderr are captured, and log records at INFO and above go to
    the captured stderr as `logging.basicConfig(format="%(message)s")` sends them in a CLI process. SystemExit
    (argparse's exit 2) becomes the return code; any other exception propagates (a subprocess would print a
    traceback and exit 1, which every caller treats as a failure)."""
    main = importlib.import_module(_module_for(script)).main
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with _env(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=err)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return CliResult(0 if rc is None else int(rc), out.getvalue(), err.getvalue())
