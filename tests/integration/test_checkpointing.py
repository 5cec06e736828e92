"""Checkpoint writes are atomic: a failure mid-save leaves the previous checkpoint and tracker intact."""
import os

import pytest
import torch

from megatron import checkpointing
from megatron.training import pretrain
from tests.conftest import tiny_train_argv


def test_failed_save_keeps_previous_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    save = str(tmp_path / "ck")
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "3", "--save", save))
    st = r["state"]
    before = open(os.path.join(save, "latest_checkpointed_iteration.txt")).read()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk vanished mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    st.iteration = 5
    with pytest.raises(checkpointing.CheckpointError, match=r"iteration 5 failed \(disk vanished mid-write\); "
                                                            r"nothing of it was kept, and the previous checkpoint "
                                                            r"\(iteration 3\) is intact"):
        checkpointing.save_checkpoint(save, 5, st.model, st.optimizer, st.scheduler, None, {"consumed_samples": 0,
                                      "consumed_tokens": 0}, {}, st.groups)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == before == "3"
    assert sorted(os.listdir(save)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]  # no partial dir
    d, it = checkpointing.resolve_checkpoint_dir(save)
    payload, _ = checkpointing.load_dense(save)
    assert it == 3 and payload["iteration"] == 3


def test_resave_same_iteration_replaces_atomically(tiny_corpus, tmp_path):
    save = str(tmp_path / "ck")
    r = pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--save", save))
    st = r["state"]
    checkpointing.save_checkpoint(save, 2, st.model, st.optimizer, st.scheduler, None,
                                  {"consumed_samples": 9, "consumed_tokens": 288}, {}, st.groups)
    assert sorted(os.listdir(save)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]  # no temp left
    payload, _ = checkpointing.load_dense(save)  # the new content replaced the old one
    assert payload["counters"] == {"consumed_samples": 9, "consumed_tokens": 288} and payload["configs"] == {}
    for k, v in st.model.state_dict().items():
        assert torch.equal(payload["model"][k], v), k


def test_tensorboard_scalars_written(tiny_corpus, tmp_path):
    tb = tmp_path / "tb"
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "5", "--tensorboard-dir", str(tb),
                             "--eval-interval", "5", "--log-validation-ppl-to-tensorboard"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"lm-loss", "learning-rate", "grad-norm", "validation/lm-loss", "validation/lm-ppl"} <= tags


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a full disk) needs root")
def test_full_disk_during_save_from_the_command_line(tiny_corpus, tmp_path):
    """pretrain_gpt.py --save on a disk with room for one checkpoint: the second save fails with one line and exit
    2; the first checkpoint and the tracker are intact and load, and no partial directory is left."""
    import subprocess

    from tests.inprocess import run_cli

    probe = tmp_path / "probe"
    pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--save", str(probe)))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(probe) for f in fs)
    mnt = tmp_path / "small"
    mnt.mkdir()
    kib = (size * 3 // 2) // 1024 + 8  # one checkpoint fits, two do not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        argv = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--save-interval", "2",
                               "--save", str(mnt / "ck"))
        r = run_cli("pretrain_gpt.py", argv)  # main(argv) in-process: its exit code and stderr
        lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error")]  # (data logs aside)
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "iteration 4 failed (the disk is full)" in lines[0] and "(iteration 2) is intact" in lines[0]
        assert sorted(os.listdir(mnt / "ck")) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
        payload, _ = checkpointing.load_dense(str(mnt / "ck"))
        assert payload["iteration"] == 2
    finally:
        subprocess.run(["umount", str(mnt)])


def test_user_model_with_moe_wrappers_saved_whole_or_refused(tmp_path):
    """moe.MoE inside a user's model: without layer_index its experts cannot be named, so the save is refused before
    anything is written; with it, every parameter (experts included) comes back from the checkpoint."""
    from moe import MoE

    class UserModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 8)
            self.blocks = torch.nn.ModuleList(MoE(8, num_experts=4, k=2, ffn_hidden_size=16) for _ in range(2))

    torch.manual_seed(0)
    model = UserModel()
    with pytest.raises(checkpointing.CheckpointError, match=r"MoE layer blocks.0.moe has no layer_index"):
        checkpointing.save_checkpoint(str(tmp_path / "ck"), 1, model, None, None, None, {}, {})
    assert not os.path.exists(tmp_path / "ck" / "iter_0000001") and not os.path.exists(tmp_path / "ck" / TRACKER_NAME)
    for i, block in enumerate(model.blocks):
        block.moe.layer_index = i
    checkpointing.save_checkpoint(str(tmp_path / "ck"), 1, model, None, None, None, {}, {})
    torch.manual_seed(1)
    other = UserModel()
    for i, block in enumerate(other.blocks):
        block.moe.layer_index = i
    payload, ckpt_dir = checkpointing.load_dense(str(tmp_path / "ck"))
    checkpointing.load_model_state(other, payload, ckpt_dir)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n  # experts too: they came from the per-expert files
    os.remove(checkpointing.expert_path(ckpt_dir, 1, 3))
    with pytest.raises(checkpointing.CheckpointError, match=r"layer_1_expert_3_mp_rank_00_model_states.pt is missing"):
        checkpointing.load_model_state(other, payload, ckpt_dir)


TRACKER_NAME = "latest_checkpointed_iteration.txt"
