"""One exit-code smoke test per command-line tool that the other tests call in-process (tests/inprocess.run_cli):
the real script, in a fresh interpreter, turns a user's mistake into one `error:` line on stderr and exit code 2.
(pretrain_gpt.py: tests/cli/test_cli_errors.py and test_graceful_exit.py; tools/eval_zeroshot.py:
test_eval_cli.py; tools/study_budget.py: test_study_tools.py.)"""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CASES = {
    "tools/generate.py": (["--load", "{tmp}/nope", "--prompt", "x"], "--load"),
    "tools/preprocess_data.py": (["--input", "{tmp}/missing.jsonl", "--output-prefix", "{tmp}/o", "--tokenizer-type",
                                  "GPT2BPETokenizer"], "--input {tmp}/missing.jsonl"),
    "tools/offload_experts.py": (["--load", "{tmp}/nope", "--out", "{tmp}/store"], "{tmp}/nope"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_user_error_is_one_line_and_exit_2(script, tmp_path):
    argv, needle = CASES[script]
    fill = lambda s: s.format(tmp=tmp_path)  # noqa: E731
    p = subprocess.run([sys.executable, script, *map(fill, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and "error: " in lines[0] and fill(needle) in lines[0], p.stderr[-2000:]
