"""tools/eval_zeroshot.py: data hash checks and bad input exit 2 with one line; an end-to-end run writes the report."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron import checkpointing
from megatron.config import ModelConfig
from megatron.data.data_files import DataFileError, default_data_dir, resolve
from megatron.model import GPTModel
from tests.conftest import ROOT


def _load_cli():
    spec = importlib.util.spec_from_file_location("eval_zeroshot", os.path.join(ROOT, "tools", "eval_zeroshot.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cli = _load_cli()


@pytest.fixture(scope="module")
def real_data_dir():
    """The registered LAMBADA and PIQA files (hash-checked); tests that need them skip without them."""
    try:
        for name in ("lambada", "piqa-valid", "piqa-valid-labels"):
            resolve(name)
    except DataFileError as e:
        pytest.skip(f"LAMBADA/PIQA not under {default_data_dir()} ({e}); run tools/download_data.py")
    return str(default_data_dir())


def save_tiny_checkpoint(root, tokenizer_model, moe=None, window=256):
    """A random-init 2-layer GPT with the tiny SentencePiece tokenizer, saved like pretrain_gpt.py --save does."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=window,
                      max_position_embeddings=window, padded_vocab_size=128)
    model = GPTModel(cfg, moe)
    configs = {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe) if moe else None,
               "tokenizer": {"tokenizer_type": "SentencePieceTokenizer", "vocab_file": None, "merge_file": None,
                             "tokenizer_model": tokenizer_model, "make_vocab_size_divisible_by": 64}}
    checkpointing.save_checkpoint(str(root), 1, model, None, None, None, {}, configs)
    return str(root)


def _one_error_line(rc, stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert rc == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_bad_hash_exits_2_with_one_line_naming_the_file(tmp_path):
    (tmp_path / "lambada").mkdir()
    (tmp_path / "lambada" / "lambada_test.jsonl").write_text('{"text": "not the real file"}\n')
    # the exit-code smoke test of tools/eval_zeroshot.py: a real process
    p = subprocess.run([sys.executable, "tools/eval_zeroshot.py", "--load", str(tmp_path / "no_ckpt"), "--tasks",
                        "lambada", "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    line = _one_error_line(p.returncode, p.stderr)
    assert "lambada/lambada_test.jsonl" in line and "sha256" in line and "tools/download_data.py" in line


@pytest.mark.parametrize("argv,needle", [
    (["--tasks", "piqa"], "piqa/valid.jsonl: missing"),  # data is checked before the checkpoint is read
    (["--tasks", "lambada,hellaswag"], "--tasks: unknown task 'hellaswag'"),
    (["--micro-batch-size", "0"], "--micro-batch-size (0) must be >= 1"),
])
def test_bad_input_exits_2_in_process(tmp_path, capsys, argv, needle):
    rc = cli.main(["--load", str(tmp_path / "no_ckpt"), "--data-dir", str(tmp_path), "--no-progress", *argv])
    assert needle in _one_error_line(rc, capsys.readouterr().err)


def test_bad_load_exits_2(tmp_path, capsys, real_data_dir):
    rc = cli.main(["--load", str(tmp_path / "no_ckpt"), "--data-dir", real_data_dir, "--no-progress"])
    assert "--load" in _one_error_line(rc, capsys.readouterr().err)


def test_end_to_end_writes_report_and_table(tmp_path, capsys, tiny_corpus, real_data_dir):
    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"])
    out = tmp_path / "results.json"
    rc = cli.main(["--load", ckpt, "--data-dir", real_data_dir, "--limit", "6", "--micro-batch-size", "4",
                   "--eval-fp32", "--output", str(out), "--no-progress", "--bootstrap-iters", "100"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    assert report["checkpoint"] == os.path.abspath(ckpt)
    got = {(r["task"], r["metric"]): r for r in report["results"]}
    assert set(got) == {("lambada", "acc"), ("lambada", "ppl"), ("piqa", "acc"), ("piqa", "acc_norm")}
    for r in got.values():
        assert r["num_examples"] == 6 and r["seconds"] > 0 and r["stderr"] >= 0
    assert got[("lambada", "ppl")]["value"] > 1.0
    assert "| lambada | whole last word | acc" in captured.out and "| piqa |" in captured.out
    assert [t["task"] for t in report["timings"]] == ["lambada", "piqa"]


def test_continuation_longer_than_window_is_scored_not_refused(tmp_path, capsys, caplog, tiny_corpus, real_data_dir):
    """PIQA at a 16-token window: solutions longer than the window are scored on their last 16 tokens (the
    harness's truncation, megatron.eval.scorer.model_input) with one warning, not refused."""
    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"])
    out = tmp_path / "results.json"
    rc = cli.main(["--load", ckpt, "--data-dir", real_data_dir, "--tasks", "piqa", "--limit", "20",
                   "--seq-length", "16", "--no-progress", "--bootstrap-iters", "10", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert {r["metric"] for r in json.loads(out.read_text())["results"]} == {"acc", "acc_norm"}
    assert any("longer than the model window (16 tokens" in r.getMessage() for r in caplog.records)


def test_moe_checkpoint_dropless_and_capacity_override(tmp_path, capsys, tiny_corpus, real_data_dir):
    from moe.config import MoEConfig

    moe = MoEConfig(num_experts=4, expert_interval=2, topk=2, eval_capacity_factor=1.0)
    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"], moe)
    common = ["--load", ckpt, "--data-dir", real_data_dir, "--tasks", "lambada", "--limit", "4", "--no-progress",
              "--bootstrap-iters", "50"]
    # dropless is the default; --moe-eval-token-dropping or a capacity factor opts back into capacity routing
    for extra, drop, cf in (([], False, None), (["--disable-moe-token-dropping"], False, None),
                            (["--moe-eval-token-dropping"], True, 1.0), (["--moe-eval-capacity-factor", "2"], True, 2.0)):
        out = tmp_path / "r.json"
        rc = cli.main([*common, *extra, "--output", str(out)])
        assert rc == 0, capsys.readouterr().err
        settings = json.loads(out.read_text())["settings"]["moe"]
        assert settings == {"routing": "capacity (token dropping)" if drop else "dropless", "drop_tokens": drop,
                            "eval_capacity_factor": cf}


def test_moe_results_identical_at_micro_batch_1_and_16_by_default(tmp_path, capsys, tiny_corpus, real_data_dir):
    """Issue 17: the eval capacity counted the batch's tokens, so numbers moved with --micro-batch-size; dropless
    routing (the default) makes every request's numbers independent of its neighbours."""
    from moe.config import MoEConfig

    moe = MoEConfig(num_experts=4, expert_interval=2, topk=1, eval_capacity_factor=0.5)  # tight: drops if allowed
    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"], moe)
    values = {}
    for mbs in (1, 16):
        out = tmp_path / f"r{mbs}.json"
        rc = cli.main(["--load", ckpt, "--data-dir", real_data_dir, "--limit", "10", "--micro-batch-size", str(mbs),
                       "--no-progress", "--bootstrap-iters", "10", "--output", str(out)])
        assert rc == 0, capsys.readouterr().err
        report = json.loads(out.read_text())
        assert report["settings"]["moe"]["routing"] == "dropless"
        values[mbs] = {(r["task"], r["metric"]): r["value"] for r in report["results"]}
    for key, v in values[1].items():
        # accuracies identical; perplexity to fp32 rounding (an expert GEMM's row count follows the batch)
        assert values[16][key] == (v if key[1] != "ppl" else pytest.approx(v, rel=1e-6)), key
