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
    with pytest.raises(OSError):
        checkpointing.save_checkpoint(save, 5, st.model, st.optimizer, st.scheduler, None, {"consumed_samples": 0,
                                      "consumed_tokens": 0}, {}, st.groups)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == before == "3"
    assert not os.path.exists(os.path.join(save, "iter_0000005"))
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
                             "--eval-interval", "5"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"lm-loss", "learning-rate", "grad-norm", "validation/lm-loss", "validation/lm-ppl"} <= tags
