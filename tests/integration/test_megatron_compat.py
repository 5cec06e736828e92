"""Megatron(-DeepSpeed) training semantics: batch-size ramp-up, sample/token-based LR schedules, the seqlen curriculum,
--train-tokens as a stop, auto-resume from an empty --load, the scheduler-override flags, the TensorBoard flags.
Each is checked against the formula of the reference implementation, computed by hand here."""
import json
import math

import pytest
import torch

from megatron import training
from megatron.config import CurriculumConfig, DataConfig, OptimizerConfig, SchedulerConfig
from megatron.curriculum import scheduled_seqlen
from megatron.errors import CheckpointError
from megatron.microbatches import global_batch_size_at, train_iters_from_samples
from megatron.optimizer import OptimizerParamScheduler
from megatron.training import pretrain
from tests.conftest import tiny_train_argv
from tests.inprocess import run_cli


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else None


def _argv(corpus, tmp_path, *extra):
    argv = tiny_train_argv(corpus, tmp_path, *extra)
    argv[argv.index("--log-interval") + 1] = "1"
    return argv


# ------------------------------------------------------------------------------------------------ ramp-up
def test_rampup_batch_per_iteration_follows_megatrons_formula(tiny_corpus, tmp_path):
    """--rampup-batch-size 2 2 12 --global-batch-size 8: n_inc = (8-2)/2 = 3 increments of 12/3 = 4 samples; the
    batch of a step after c consumed samples is 8 if c > 12 else 2 + 2*floor(c/4) (Megatron's
    RampupBatchsizeNumMicroBatches). By hand: 2 (c=0), 2 (c=2), 4 (c=4), 6 (c=8), then 8 (c=14 > 12)."""
    data = DataConfig(micro_batch_size=2, global_batch_size=8, rampup_batch_size=(2, 2, 12))
    for c in range(0, 60):
        assert global_batch_size_at(c, data) == (8 if c > 12 else 2 + 2 * math.floor(c / 4))
    # Megatron's update_train_iters for --train-samples 40: 4 ramp-up steps reach c = 14 > 12, then (40-14)//8 = 3
    assert train_iters_from_samples(40, data) == 7
    tb = tmp_path / "tb"
    r = pretrain(_argv(tiny_corpus, tmp_path, "--train-samples", "40", "--rampup-batch-size", "2", "2", "12",
                       "--global-batch-size", "8", "--lr-warmup-iters", "0", "--lr-warmup-samples", "4",
                       "--lr-decay-style", "linear", "--tensorboard-dir", str(tb), "--log-batch-size-to-tensorboard"))
    st = r["state"]
    batches = [v for _, v in _scalars(tb, "batch-size")]
    assert batches == [2, 2, 4, 6, 8, 8, 8] and st.iteration == 7
    assert st.consumed_samples == 38 and st.consumed_tokens == 38 * 32
    # the sample-based LR (Megatron: steps counted in samples): warmup over 4 samples, linear decay to --min-lr over
    # --train-samples 40 samples; after iteration k the schedule has seen n_k = 2, 4, 8, 14, 22, 30, 38 samples
    lr, min_lr = 3e-3, 3e-4
    expected = []
    for n in (2, 4, 8, 14, 22, 30, 38):
        expected.append(lr * n / 4 if n <= 4 else min_lr + (1 - (n - 4) / (40 - 4)) * (lr - min_lr))
    got = [v for _, v in _scalars(tb, "learning-rate")]
    assert got == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32


def test_rampup_needs_sample_based_training():
    from megatron.arguments import parse_args, train_config_from_args

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--global-batch-size", "8"]
    with pytest.raises(ValueError, match=r"--rampup-batch-size needs sample-based training"):
        train_config_from_args(parse_args(base + ["--train-iters", "5", "--rampup-batch-size", "2", "2", "8"]), 128)
    with pytest.raises(ValueError, match=r"--rampup-batch-size 2 2: expected three integers"):
        train_config_from_args(parse_args(base + ["--train-samples", "50", "--rampup-batch-size", "2", "2"]), 128)
    with pytest.raises(ValueError, match=r"--train-iters and --train-samples are mutually exclusive"):
        train_config_from_args(parse_args(base + ["--train-samples", "50", "--train-iters", "5"]), 128)
    cfg = train_config_from_args(parse_args(base + ["--train-samples", "50", "--rampup-batch-size", "3", "1", "8"]),
                                 128, dp_size=2)
    from megatron.arguments import validate

    with pytest.raises(ValueError, match=r"the global batch 3 of the ramp-up is not divisible"):
        validate(cfg, world_size=2)


# ------------------------------------------------------------------------------------------------ LR schedule
def test_token_based_lr_follows_consumed_tokens_one_step_behind():
    """Megatron-DeepSpeed: warmup/decay by tokens read args.consumed_train_tokens, which the loop advances after the
    step, so update k sees the tokens of the k-1 steps before it. 100 tokens a step, warmup 250, decay 1000."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    s = OptimizerParamScheduler(opt, OptimizerConfig(lr=1.0, min_lr=0.1),
                                SchedulerConfig(lr_decay_style="cosine", train_iters=20, lr_warmup_tokens=250,
                                                lr_decay_tokens=1000))
    for k in range(1, 16):
        tokens = 100 * (k - 1)
        lr = s.step(1, samples=4, tokens=tokens)
        if tokens <= 250:
            want = tokens / 250
        elif tokens > 1000:
            want = 0.1
        else:
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (tokens - 250) / 750))
        assert lr == pytest.approx(want), k


def test_resume_with_other_schedule_flags_needs_an_override(tiny_corpus, tmp_path):
    ck = str(tmp_path / "ck")
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--save", ck, "--save-interval", "2",
                             "--exit-interval", "2"))
    with pytest.raises(CheckpointError, match=r"--lr gives 0.002 but the checkpoint's LR schedule has 0.003; pass "
                                              r"--override-opt_param-scheduler"):
        pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--load", ck, "--lr", "2e-3"))
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--load", ck, "--lr", "2e-3",
                                 "--override-opt_param-scheduler"))
    assert r["state"].scheduler.max_lr == 2e-3 and r["state"].iteration == 4
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--load", ck, "--lr", "2e-3",
                                 "--use-checkpoint-opt_param-scheduler"))
    assert r["state"].scheduler.max_lr == 3e-3


def test_train_tokens_stops_first(tiny_corpus, tmp_path):
    """--train-iters 50 --train-tokens 300: 4 x 32 = 128 tokens a step, so training stops after ceil(300/128) = 3."""
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "50", "--train-tokens", "300"))
    assert r["state"].iteration == 3 and r["state"].consumed_tokens == 384


# ------------------------------------------------------------------------------------------------ curriculum
def _fixed_linear_by_hand(step, lo, hi, total, dstep):
    """DeepSpeed's fixed_linear: floor(step/total * (hi - lo) + lo), down to a multiple of dstep, within [lo, hi]."""
    d = math.floor(step / total * (hi - lo) + lo)
    d -= d % dstep
    return min(max(d, lo), hi)


def test_curriculum_schedule_equals_deepspeeds_fixed_linear():
    cfg = CurriculumConfig(min_difficulty=16, max_difficulty=64, total_curriculum_step=20, difficulty_step=8)
    got = [scheduled_seqlen(cfg, s) for s in range(1, 31)]
    assert got == [_fixed_linear_by_hand(s, 16, 64, 20, 8) for s in range(1, 31)]
    assert (got[0], got[9], got[14], got[19], got[29]) == (16, 40, 48, 64, 64)  # 18.4->16, 40, 52->48, 64, capped
    disc = CurriculumConfig(min_difficulty=8, max_difficulty=32, schedule_type="fixed_discrete", difficulty=(8, 16, 32),
                            max_step=(3, 6))
    assert [scheduled_seqlen(disc, s) for s in range(1, 9)] == [8, 8, 8, 16, 16, 16, 32, 32]


def test_curriculum_schedule_equals_deepspeeds_own_scheduler():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed; the hand formula test covers the schedule")
    from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

    for block, ours in (
            ({"min_difficulty": 16, "max_difficulty": 64, "schedule_type": "fixed_linear",
              "schedule_config": {"total_curriculum_step": 20, "difficulty_step": 8}},
             CurriculumConfig(16, 64, "fixed_linear", 20, 8)),
            ({"min_difficulty": 8, "max_difficulty": 48, "schedule_type": "fixed_root",
              "schedule_config": {"total_curriculum_step": 15, "difficulty_step": 8, "root_degree": 2}},
             CurriculumConfig(8, 48, "fixed_root", 15, 8, 2))):
        ds = CurriculumScheduler(block)
        assert [ds.update_difficulty(s) for s in range(1, 40)] == [scheduled_seqlen(ours, s) for s in range(1, 40)]


def _cl_argv(corpus, tmp_path, ds_dir, *extra):
    ds = ds_dir / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "curriculum_learning": {
        "enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 32,
        "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 8}}}))
    return _argv(corpus, tmp_path, "--deepspeed", "--deepspeed_config", str(ds), *extra)


def test_curriculum_truncates_each_batch(tiny_corpus, tmp_path, monkeypatch):
    seen = []
    real = training.forward_loss

    def spy(st, tokens, labels, mask):
        if st.model.training:
            seen.append((tokens.shape[1], labels.shape[1], mask.shape[1]))
        return real(st, tokens, labels, mask)

    monkeypatch.setattr(training, "forward_loss", spy)
    tb = tmp_path / "tb"
    a = pretrain(_cl_argv(tiny_corpus, tmp_path / "a", tmp_path, "--train-iters", "8", "--tensorboard-dir", str(tb),
                          "--hidden-dropout", "0.1"))
    want = [_fixed_linear_by_hand(s, 8, 32, 6, 8) for s in range(1, 9)]  # 8, 16, 16, 24, 24, 32, 32, 32
    assert [s for s, _, _ in seen[::2]] == want and all(x == y == z for x, y, z in seen)  # 2 micro-batches a step
    assert [int(v) for _, v in _scalars(tb, "seqlen/curriculum_seqlen")] == want
    assert a["state"].consumed_tokens == sum(4 * s for s in want)
    # exact resume (4 + save + 4 equals 8 straight; the schedule is a function of the iteration):
    # tests/integration/test_resume_exactness.py, case "curriculum"


# ------------------------------------------------------------------------------------------------ auto-resume
def _cli(argv):
    """pretrain_gpt.py's main(argv) in this process (one warning line on stderr is the point, not the process)."""
    return run_cli("pretrain_gpt.py", argv)


def test_load_of_a_missing_directory_starts_fresh_with_one_warning(tiny_corpus, tmp_path):
    """The scripts pass --load and --save the same directory on every launch (Megatron starts from scratch when
    nothing is there yet); the second launch resumes from what the first saved."""
    ck = str(tmp_path / "ck")
    flags = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--load", ck, "--save", ck,
                            "--save-interval", "2", "--exit-interval", "2")
    first = _cli(flags)
    assert first.returncode == 0, first.stderr[-2000:]
    warnings = [l for l in first.stderr.splitlines() if "WARNING" in l]
    assert warnings == [f"WARNING: --load {ck}: no such directory; starting from scratch"]
    second = _cli(flags)
    assert second.returncode == 0 and "WARNING: --load" not in second.stderr
    assert f"loaded checkpoint {ck} at iteration 2" in second.stdout


def test_empty_load_directory_starts_fresh_but_checkpoints_without_tracker_do_not(tiny_corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--load", str(empty)))
    assert r["state"].iteration == 2
    (empty / "iter_0000002").mkdir()  # a checkpoint is there, its tracker is not: refusing beats training over it
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration.txt is missing"):
        pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--load", str(empty)))


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_flags_write_what_they_name(tiny_corpus, tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    common = ("--train-iters", "3", "--eval-interval", "3")
    pretrain(_argv(tiny_corpus, tmp_path, *common, "--tensorboard-dir", str(on), "--log-timers-to-tensorboard",
                   "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
                   "--log-optimizer-states-to-tensorboard", "--tensorboard-queue-size", "1"))
    pretrain(_argv(tiny_corpus, tmp_path, *common, "--tensorboard-dir", str(off)))
    tags = {"iteration-time", "timers/forward-backward-time", "timers/optimizer-time", "batch-size",
            "validation/lm-ppl", "optimizer/variance_l2", "optimizer/momentum_abs_max", "optimizer/weight_l1"}
    for t in tags:
        assert _scalars(on, t), t
        assert _scalars(off, t) is None, t
    assert [v for _, v in _scalars(on, "batch-size")] == [4, 4, 4]
    loss, ppl = _scalars(on, "validation/lm-loss")[0][1], _scalars(on, "validation/lm-ppl")[0][1]
    assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
