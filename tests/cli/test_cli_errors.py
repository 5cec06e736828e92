"""One validation pass, and CLIs that report only the user's mistakes as one line.

- each check that used to be duplicated now lives in one place, and still fires through `pretrain_gpt.py` as one
  line naming the flag, exit 2;
- an internal bug (any exception that is not a megatron.errors.UserError) keeps its traceback, in pretrain_gpt.py
  and in every tool's main();
- pretrain() builds its configuration through arguments.configure only.
"""
import ast
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap

import pytest

from megatron import training, training_setup
from megatron.errors import ConfigError
from tests.conftest import ROOT, tiny_train_argv
from tests.inprocess import run_cli


def _run(argv, env_extra=None, pythonpath_first=None):
    """pretrain_gpt.py in a fresh process (the traceback test below: a sitecustomize hook and the exit code)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    paths = [p for p in (pythonpath_first, ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, "pretrain_gpt.py", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# (extra flags, WORLD_SIZE as torchrun would set it, the one line's text). Validation runs before the process
# group is created, so WORLD_SIZE alone reaches the cross-concern checks without launching several processes.
SINGLE_CHECKS = [
    # TP divisibility: arguments.validate (pretrain's own check and the attention layer's are gone)
    (["--tensor-model-parallel-size", "3"], "3",
     "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)"),
    # (world % TP, parallel_state.validate_sizes: tests/integration/test_training.py::test_bad_input_exits_2_with_one_line)
    # experts % EP: MoEConfig only (MoELayer no longer repeats it)
    (["--num-experts", "3", "--moe-expert-parallel-size", "2"], "2",
     "--num-experts (3) must be divisible by --moe-expert-parallel-size (2)"),
    # EP x ETP must divide the stage's TP x CP x DP ranks (the expert grid): parallel_state.validate_sizes
    (["--num-experts", "2", "--moe-expert-parallel-size", "2"], "1",
     "--moe-expert-parallel-size (2) x --expert-tensor-parallel-size (1) = 2 must divide the ranks of a pipeline "
     "stage"),
    # top-k range: MoEConfig only
    (["--num-experts", "2", "--topk", "3"], "1", "--topk (3) must be between 1 and the smallest --num-experts (2)"),
    # fp16 vs bf16: OptimizerConfig only (validate no longer repeats it)
    (["--fp16", "--bf16"], "1", "--fp16 and --bf16 are mutually exclusive; pick one"),
    # iterations vs samples: the flag mapping only (--train-tokens beside --train-iters is Megatron-DeepSpeed's extra
    # stop condition, tests/integration/test_megatron_compat.py::test_train_tokens_stops_first)
    (["--train-samples", "64"], "1", "--train-iters and --train-samples are mutually exclusive; give one"),
]


@pytest.mark.parametrize("extra,world,needle", SINGLE_CHECKS, ids=[c[2][:40] for c in SINGLE_CHECKS])
def test_each_check_fires_once_as_one_line(tiny_corpus, tmp_path, extra, world, needle):
    # in-process main(argv): validation reads WORLD_SIZE before any process group exists
    p = run_cli("pretrain_gpt.py", tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", *extra),
                env={"WORLD_SIZE": world})
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr


def test_internal_bug_keeps_its_traceback(tiny_corpus, tmp_path):
    """A bug inside the training path (here: the data set-up raising a bare ValueError, as a bug would; main() used
    to catch every ValueError) is not a user error: pretrain_gpt.py must exit non-zero with the traceback, not
    'error: boom' and exit 2."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import megatron.training_setup

        def _bug(*args, **kwargs):
            raise ValueError("boom")

        megatron.training_setup.build_data_iterators = _bug
    """))
    p = _run(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2"), pythonpath_first=str(hook))
    assert p.returncode not in (0, 2), (p.returncode, p.stderr)
    assert "Traceback (most recent call last)" in p.stderr and "_bug" in p.stderr, p.stderr
    assert "ValueError: boom" in p.stderr and "error: boom" not in p.stderr


def test_pretrain_reads_only_the_config():
    """args -> config happens once, in arguments.configure: pretrain() names no argparse namespace, and training.py
    imports nothing else from megatron.arguments (no parse_args / train_config_from_args of its own)."""
    names = set()
    for fn in (training.pretrain, training.setup_from_argv):  # pretrain's set-up half (shared with lr_range_test)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "args" not in names and "argv" in names and "configure" in names, sorted(names)
    from_arguments = set()
    for path in (training.__file__, training_setup.__file__):
        module = ast.parse(open(path).read())
        from_arguments |= {a.name for n in ast.walk(module) if isinstance(n, ast.ImportFrom)
                           and n.module == "megatron.arguments" for a in n.names}
    assert from_arguments == {"configure"}, from_arguments


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# tool -> (function inside its main's try block to break, argv that reaches it)
TOOLS = {
    "eval_zeroshot": ("run_zeroshot", ["--load", "CKPT"]),
    "generate": ("load_model_for_inference", ["--load", "CKPT", "--prompt", "x"]),
    "offload_experts": ("write_expert_store", ["--load", "CKPT", "--out", "OUT"]),
    "preprocess_data": ("run", None),
    "download_data": ("fetch", ["--data-dir", "D", "--only", "lambada"]),
    "checkpoint_tp": ("convert", ["--load", "CKPT", "--save", "OUT", "--target-tp", "1"]),
    "checkpoint_reshard": ("convert", ["--load", "CKPT", "--save", "OUT", "--target-tp", "1", "--target-pp", "2"]),
    "train_tokenizer": ("train", None),
}


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tools_report_user_errors_and_keep_bugs(name, monkeypatch):
    """Every tools/ CLI turns a UserError into one line + exit 2, and lets any other exception through."""
    mod = _tool(name)
    target, argv = TOOLS[name]
    if argv is None:  # main() is `return run(get_args(argv))`: skip the flag parsing, break what it calls
        monkeypatch.setattr(mod, "get_args", lambda argv=None: None)
        argv = []

    def user_error(*a, **k):
        raise ConfigError("--some-flag (7) is wrong; give 8")

    def bug(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(mod, target, user_error)
    assert mod.main(argv) == 2
    monkeypatch.setattr(mod, target, bug)
    with pytest.raises(ValueError, match="boom"):
        mod.main(argv)


@pytest.mark.parametrize("scale", ["abc", "0", "-0.5"])
def test_study_script_refuses_a_bad_moe_lr_scale_before_writing(tmp_path, scale):
    """examples_moe/run_study.sh: MOE_LR_SCALE must be a positive number; anything else is one line naming it and exit
    2 before the script writes anything (a non-number used to leave the MoE arms at the dense LR silently)."""
    out = tmp_path / "study"
    env = dict(os.environ, MOE_LR_SCALE=scale, OUT=str(out))
    p = subprocess.run(["bash", "examples_moe/run_study.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"MOE_LR_SCALE={scale}" in p.stderr, p.stderr
    assert not out.exists()
