"""Exact resume, one harness for every training mode: a straight run of N iterations (saving at N/2 and N) against a
run that loads its N/2 checkpoint and trains to N. Bit for bit (fp32 on CPU, dropout on where the case has it):
every returned loss, the final in-memory weights, the counters, and the two checkpoints at N (dense weights, Adam
state, scheduler, loss scaler, RNG streams, every per-expert file).

Two runs per case, where the tests this replaces ran three (straight / stop with --exit-interval / --load): the
stop run's first N/2 losses are the straight run's first N/2 iterations computed again by the same code with the
same flags, so they add nothing; what the stop run did add -- the --exit-interval exit path -- is checked on its
own below (test_exit_interval_stops_saves_and_reports_it), and the checkpoint a resume starts from is here written
by a save mid-run, which is also what --exit-interval calls. Cases where the two runs differ on purpose (offload
written / read by the in-memory optimizer, recompute only in the resumed run) check that the difference is
invisible as well.
"""
import json
import os

import numpy as np
import pytest
import torch

from megatron import checkpointing
from megatron.training import pretrain
from tests.conftest import tiny_train_argv

MOE = ("--num-experts", "4", "--topk", "2", "--moe-expert-parallel-size", "1")
MOE4 = ("--num-layers", "4", "--num-experts", "4", "--expert-interval", "2", "--topk", "2",
        "--moe-train-capacity-factor", "1.25", "--moe-eval-capacity-factor", "2.0", "--moe-loss-coeff", "0.01")
ONE_CYCLE = ("--lr-warmup-iters", "0", "--lr-decay-style", "one-cycle", "--cycle-min-lr", "1e-3", "--cycle-max-lr",
             "1e-2", "--cycle-first-step-size", "2", "--cycle-second-step-size", "3", "--cycle-min-mom", "0.7",
             "--cycle-max-mom", "0.9", "--hidden-dropout", "0", "--attention-dropout", "0")


def _curriculum(tmp):
    ds = tmp / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "curriculum_learning": {
        "enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 32,
        "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 8}}}))
    return ("--deepspeed", "--deepspeed_config", str(ds), "--hidden-dropout", "0.1", "--log-interval", "1")


def _offload(tmp, name):
    return ("--moe-offload-optimizer", "nvme", "--moe-offload-dir", str(tmp / name))


def _user_defaults(argv):
    """As a user runs it: no --peak-flops (the start-up GEMM probe runs), a data-loader worker, every step logged."""
    i = argv.index("--peak-flops")
    del argv[i:i + 2]
    argv[argv.index("--num-workers") + 1] = "1"
    argv[argv.index("--log-interval") + 1] = "1"
    return argv


# name -> (iterations, flags of both runs, flags of the straight run only, flags of the resumed run only, argv edit)
# (a function of tmp_path where flags name files). The tests each case replaces are named on its line.
CASES = {
    # test_training.py::test_exact_resume_bitwise: dense, dropout 0.1, evaluation every 5 iterations
    "dense": lambda tmp: (20, ("--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--eval-interval", "5"),
                          (), (), None),
    # test_moe_training.py::test_moe_exact_resume_with_per_expert_files: 4 layers, 2 MoE, capacity, aux loss
    "moe": lambda tmp: (12, ("--hidden-dropout", "0.1", *MOE4), (), (), None),
    # test_resume_cli.py::test_straight_run_equals_exit_save_resume_from_the_command_line: default flags
    "moe-user-defaults": lambda tmp: (8, MOE, (), (), _user_defaults),
    # test_megatron_compat.py::test_curriculum_truncates_each_batch_and_resumes_exactly (its resume half)
    "curriculum": lambda tmp: (8, _curriculum(tmp), (), (), None),
    # test_lr_schedules.py::test_one_cycle_resumes_exactly_from_the_command_line: mid-cycle LR and momentum
    "one-cycle": lambda tmp: (6, ONE_CYCLE + ("--log-interval", "1"), (), (), None),
    # test_optimizer_offload.py::test_exact_resume_and_checkpoint_interchange_from_the_command_line, both
    # directions: an in-memory checkpoint resumed with offload, and an offload-saved one resumed in memory
    "offload": lambda tmp: (6, (*MOE, "--log-interval", "1"), (), _offload(tmp, "off_b"), None),
    "offload-saved": lambda tmp: (6, (*MOE, "--log-interval", "1"), _offload(tmp, "off_a"), (), None),
    # test_resume_cli.py::test_recompute_is_invisible_to_training_and_resumes_exactly: full recompute (MoE layers
    # included, dropout on) in the resumed run only, so it must be invisible as well as resumable
    "recompute": lambda tmp: (8, MOE, (), ("--checkpoint-activations",), None),
}


def _assert_same(a, b, where):
    """Equal, recursively; tensors and arrays bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _checkpoint(root):
    payload, ckpt_dir = checkpointing.load_dense(root)
    experts = {f: torch.load(os.path.join(ckpt_dir, f), weights_only=True)
               for f in sorted(os.listdir(ckpt_dir)) if f.startswith("layer_")}
    return payload, experts


def _close(result):
    close = getattr(result["state"].optimizer, "close", None)
    if close is not None:  # the offload optimizer holds its store open (pretrain_gpt.py's main closes it)
        close()


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_straight_run(tiny_corpus, tmp_path, case):
    iters, both, only_a, only_b, edit = CASES[case](tmp_path)
    half = iters // 2
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    def argv(*flags):
        out = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", str(iters), *both, *flags)
        return edit(out) if edit else out

    straight = pretrain(argv(*only_a, "--save", str(a_dir), "--save-interval", str(half)))
    _close(straight)
    resumed = pretrain(argv(*only_b, "--load", checkpointing.iter_dir(str(a_dir), half), "--save", str(b_dir),
                            "--save-interval", str(half)))
    _close(resumed)
    assert len(straight["losses"]) == iters and len(resumed["losses"]) == iters - half
    assert resumed["losses"] == straight["losses"][half:]  # bit for bit
    sa, sb = straight["state"], resumed["state"]
    assert sa.iteration == sb.iteration == iters
    assert sa.consumed_samples == sb.consumed_samples == 4 * iters  # --global-batch-size 4
    assert sa.consumed_tokens == sb.consumed_tokens
    wa, wb = sa.model.state_dict(), sb.model.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the two checkpoints at N: everything but the flags (which name other directories)
    (pa, ea), (pb, eb) = _checkpoint(str(a_dir)), _checkpoint(str(b_dir))
    for key in ("iteration", "model", "optimizer", "scheduler", "loss_scaler", "rng", "counters"):
        _assert_same(pa[key], pb[key], key)
    assert pa["iteration"] == iters and pa["optimizer"]
    assert sorted(ea) == sorted(eb) and bool(ea) == ("--num-experts" in both)
    for f in ea:
        _assert_same(ea[f], eb[f], f)
    if case == "moe":  # the checkpoint resumed from: one file per (MoE layer, global expert id) beside the dense one
        mid = checkpointing.iter_dir(str(a_dir), half)
        files = sorted(os.listdir(mid))
        assert [f for f in files if f.startswith("layer_")] == sorted(
            f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(2) for e in range(4))
        dense = torch.load(os.path.join(mid, "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
        assert not any("experts" in k for k in dense["model"])


def test_exit_interval_stops_saves_and_reports_it(tiny_corpus, tmp_path):
    """--exit-interval: the run stops after that iteration, saves there (tracker updated) and says it exited."""
    save = str(tmp_path / "ckpt")
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "6", "--save", save, "--save-interval", "4",
                                 "--exit-interval", "3"))
    assert r["exited"] and len(r["losses"]) == 3 and r["state"].iteration == 3
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "3"
    assert sorted(os.listdir(save)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]
