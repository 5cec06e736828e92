"""Training loop: loss falls, bad-input exit codes, generation from a checkpoint (exact resume:
tests/integration/test_resume_exactness.py)."""
import math

import pytest

from megatron.training import pretrain
from tests.conftest import tiny_train_argv
from tests.inprocess import run_cli


def test_loss_falls_on_tiny_run(tiny_corpus, tmp_path):
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "40", "--hidden-dropout", "0.0",
                                 "--attention-dropout", "0.0"))
    first, last = sum(r["losses"][:5]) / 5, sum(r["losses"][-5:]) / 5
    # ln(128) = 4.85 at init; the synthetic grammar is learnable, so 40 steps must cut the loss by > 25%
    assert last < 0.75 * first, (first, last)
    assert r["val_loss"] is not None and r["val_loss"] < first


def _run_cli(args):
    """`python SCRIPT ARGS...` as its main(argv) in this process (the exit-code smoke tests are in tests/cli)."""
    return run_cli(args[0], args[1:])


def _one_error_line(p):
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.mark.parametrize("extra,needle", [
    (["--hidden-size", "30"], "--hidden-size (30) must be divisible by --num-attention-heads (4)"),
    (["--global-batch-size", "5"], "--global-batch-size (5) must be divisible by --micro-batch-size (2)"),
    (["--data-path", "/nonexistent/corpus_text_document"], "/nonexistent/corpus_text_document"),
    # a missing --load root starts fresh (Megatron; tests/integration/test_megatron_compat.py); a missing iter_ dir is a typo
    (["--load", "/nonexistent/ckpt/iter_0000005"], "--load /nonexistent/ckpt/iter_0000005: no such directory"),
    (["--tensor-model-parallel-size", "2"], "world size (1) must be divisible by --tensor-model-parallel-size (2)"),
])
def test_bad_input_exits_2_with_one_line(tiny_corpus, tmp_path, extra, needle):
    argv = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2") + extra
    line = _one_error_line(_run_cli(["pretrain_gpt.py", *argv]))
    assert needle in line


def test_corrupt_data_and_checkpoint_files_exit_2(tiny_corpus, tmp_path):
    bad = tmp_path / "bad_text_document"
    (tmp_path / "bad_text_document.idx").write_bytes(b"NOTMEGATRON" * 4)
    (tmp_path / "bad_text_document.bin").write_bytes(b"\0" * 64)
    line = _one_error_line(_run_cli(["pretrain_gpt.py", *tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2",
                                                                          "--data-path", str(bad))]))
    assert "bad_text_document.idx" in line
    ck = tmp_path / "ck"
    (ck / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (ck / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"garbage")
    (ck / "latest_checkpointed_iteration.txt").write_text("3")
    p = _run_cli(["pretrain_gpt.py", *tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--load", str(ck))])
    # a hand-made directory has no checksums.json: one warning says it is loaded unverified, then the one error line
    warning = f"{ck / 'iter_0000003'} has no checksums.json"
    p.stderr = "\n".join(l for l in p.stderr.splitlines() if warning not in l)
    line = _one_error_line(p)
    assert "model_optim_rng.pt" in line and "unreadable" in line


def test_checkpoint_flag_mismatch_names_field(tiny_corpus, tmp_path):
    save = str(tmp_path / "ck")
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--save", save))
    line = _one_error_line(_run_cli(["pretrain_gpt.py", *tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4",
                                                                          "--load", save, "--num-layers", "3")]))
    assert "--num-layers mismatch" in line


def test_generate_from_checkpoint_greedy_matches_no_cache(tiny_corpus, tmp_path):
    save = str(tmp_path / "ck")
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "30", "--save", save))
    args = ["tools/generate.py", "--load", save, "--prompt", "The cat", "--max-new-tokens", "12",
            "--temperature", "0"]
    a, b = _run_cli(args), _run_cli(args + ["--no-kv-cache"])
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("The cat")
    sampled = _run_cli(["tools/generate.py", "--load", save, "--prompt", "The cat", "--max-new-tokens", "12",
                        "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"])
    assert sampled.returncode == 0, sampled.stderr
    bad = _run_cli(["tools/generate.py", "--load", str(tmp_path / "nope"), "--prompt", "x"])
    assert bad.returncode == 2 and "--load" in bad.stderr


def test_bf16_autocast_training_loss_falls(tiny_corpus, tmp_path):
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "30", "--bf16", "--hidden-dropout", "0.0"))
    assert sum(r["losses"][-5:]) / 5 < 0.8 * sum(r["losses"][:5]) / 5


def test_fp16_dynamic_loss_scale_skips_overflow_steps(tiny_corpus, tmp_path):
    """A huge initial scale overflows fp16 grads: those steps are skipped (weights untouched) and the scale
    halves each time (hysteresis 1) until steps go through and the loss falls."""
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "40", "--fp16", "--initial-loss-scale",
                                 str(2.0 ** 40), "--hysteresis", "1", "--hidden-dropout", "0.0"))
    st = r["state"]
    assert st.loss_scaler.scale < 2.0 ** 40
    skipped = round(math.log2(2.0 ** 40 / st.loss_scaler.scale))
    assert 1 <= skipped < 35
    # an optimizer step happened on every non-skipped iteration only
    assert st.optimizer.state[next(iter(st.model.parameters()))]["step"] == 40 - skipped
    assert st.scheduler.num_steps == 40 - skipped  # skipped steps do not advance the LR schedule (Megatron)
    assert sum(r["losses"][-5:]) / 5 < sum(r["losses"][:5]) / 5
