"""--async-save (CheckpointManager with a background writer) and restore_rng, in-process on a tiny MoE GPT.

The asynchronous save must write exactly the synchronous save's bytes even when training changes the weights while it
writes; move the tracker only after the rename; make a second save wait for the first; report a failed write at the
next step with one line and keep the previous checkpoint."""
import os
import threading
import time
import types

import pytest
import torch

from megatron import checkpointing
from megatron.checkpointing import save as save_phases
from megatron.config import ModelConfig, OptimizerConfig
from megatron.model import GPTModel
from megatron.optimizer import build_optimizer
from megatron.tensor_parallel.random import TensorParallelRNGTracker
from moe.config import MoEConfig


class _Counters:
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"consumed_samples": self.n, "consumed_tokens": 8 * self.n}

    def load_state_dict(self, sd):
        self.n = sd["consumed_samples"]


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, seq_length=8,
                      max_position_embeddings=8, padded_vocab_size=64)
    model = GPTModel(cfg, MoEConfig(num_experts=4, expert_interval=2, topk=1))
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3))
    _step(model, opt)
    return model, opt


def _step(model, opt):
    """A stand-in for a training step: every weight and every Adam tensor changes in place."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def _manager(root, model, opt, async_save, interval=1):
    m = checkpointing.CheckpointManager(str(root), interval, model, opt, None, {"model": {"note": "test"}},
                                        async_save=async_save)
    m.register("scheduler", None)
    m.register("counters", _Counters())
    return m


def _files(d):
    return {os.path.relpath(os.path.join(dp, f), d): open(os.path.join(dp, f), "rb").read()
            for dp, _, fs in os.walk(d) for f in fs}


def test_async_save_writes_the_synchronous_bytes_while_training_changes_the_weights(tmp_path, monkeypatch):
    """Parameters and Adam state are copied on the writing thread (slowed down here); the next optimizer step waits."""
    from megatron.checkpointing.payload import CpuSnapshot

    real_copy = CpuSnapshot.copy_deferred
    monkeypatch.setattr(CpuSnapshot, "copy_deferred", lambda self: time.sleep(0.3) or real_copy(self))
    model, opt = _model_and_optimizer()
    sync = _manager(tmp_path / "sync", model, opt, async_save=False)
    asyn = _manager(tmp_path / "async", model, opt, async_save=True)
    rng = torch.get_rng_state()
    sync.maybe_save(1)
    torch.set_rng_state(rng)  # the RNG state recorded is the same for both
    asyn.maybe_save(1)
    _step(model, opt)  # training goes on while the background thread copies and writes
    assert asyn.waited_seconds > 0.1  # the step waited for the deferred copies
    asyn.wait()
    a, b = _files(tmp_path / "sync" / "iter_0000001"), _files(tmp_path / "async" / "iter_0000001")
    assert sorted(a) == sorted(b) and len(a) == 1 + 4 + 1  # dense, 4 experts, checksums.json
    for k in a:
        assert a[k] == b[k], k  # bitwise: the snapshot keeps offsets, strides and shared storages
    assert checkpointing.read_tracker(str(tmp_path / "async")) == 1
    assert sorted(os.listdir(tmp_path / "async")) == ["iter_0000001", checkpointing.TRACKER]


def _blocked_writes(monkeypatch):
    """save.write waits for the returned event before writing (the background write is 'in flight')."""
    go, real = threading.Event(), save_phases.write

    def write(p):
        assert go.wait(30)
        return real(p)
    monkeypatch.setattr(save_phases, "write", write)
    return go


def test_tracker_moves_only_after_the_rename_and_a_second_save_waits(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    root = tmp_path / "ck"
    m = _manager(root, model, opt, async_save=True, interval=2)
    renamed_first = []
    real_tracker = save_phases.write_tracker
    monkeypatch.setattr(save_phases, "write_tracker", lambda r, it: renamed_first.append(
        os.path.isdir(checkpointing.iter_dir(r, it))) or real_tracker(r, it))
    go = _blocked_writes(monkeypatch)
    m.maybe_save(2)  # returns at once: the write is blocked
    m.maybe_save(3)  # not due; the pending write has not finished: nothing is committed
    assert checkpointing.read_tracker(str(root)) is None and not os.path.exists(checkpointing.iter_dir(str(root), 2))
    assert os.path.isdir(root / ".tmp_iter_0000002")
    second = threading.Thread(target=m.maybe_save, args=(4,))
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # the second save waits for the first
    assert checkpointing.read_tracker(str(root)) is None
    go.set()
    second.join(30)
    m.wait()
    assert renamed_first == [True, True]  # each tracker update came after its directory's rename
    assert checkpointing.read_tracker(str(root)) == 4
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000004", checkpointing.TRACKER]


def test_failed_async_write_is_reported_at_the_next_step_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    root = tmp_path / "ck"
    m = _manager(root, model, opt, async_save=True)
    m.maybe_save(1)
    m.wait()

    def full_disk(obj, path, sync=True):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(save_phases, "atomic_torch_save", full_disk)
    m.maybe_save(2)  # no error yet: the write fails on the background thread
    m._inflight._thread.join(30)
    with pytest.raises(checkpointing.CheckpointError, match=r"^--save .*: writing the checkpoint of iteration 2 "
                                                            r"failed \(the disk is full\); nothing of it was kept, and "
                                                            r"the previous checkpoint \(iteration 1\) is intact"):
        m.maybe_save(3, force=False)  # the next step reports it (one line)
    assert checkpointing.read_tracker(str(root)) == 1
    assert sorted(os.listdir(root)) == ["iter_0000001", checkpointing.TRACKER]
    payload, _ = checkpointing.load_dense(str(root))
    assert payload["iteration"] == 1


def test_close_waits_for_a_pending_write(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    root = tmp_path / "ck"
    m = _manager(root, model, opt, async_save=True)
    go = _blocked_writes(monkeypatch)
    m.maybe_save(1)
    threading.Timer(0.2, go.set).start()
    m.close()  # the end of training (and an exit on a signal) settle here
    assert checkpointing.read_tracker(str(root)) == 1


@pytest.mark.parametrize("reset_iteration", [False, True])
def test_restore_rng_restores_the_tensor_parallel_stream_on_every_load_path(tmp_path, reset_iteration):
    """Before: --reset-iteration restored the global generators but not the tensor-parallel dropout stream."""
    model, opt = _model_and_optimizer()
    model.rng_tracker = TensorParallelRNGTracker(1234, tp_rank=1)
    with model.rng_tracker.fork("cpu"):
        torch.rand(3)  # the stream moves away from its seed
    checkpointing.save_checkpoint(str(tmp_path), 1, model, opt, None, None,
                                  {"consumed_samples": 0, "consumed_tokens": 0}, {"model": {}})
    saved_tp, saved_global = model.rng_tracker.get_states()["cpu"], torch.get_rng_state()
    with model.rng_tracker.fork("cpu"):
        torch.rand(3)
    torch.rand(3)
    ck = types.SimpleNamespace(load=str(tmp_path), save=None, load_fallback=False, finetune=False,
                               reset_iteration=reset_iteration, no_load_optim=True, no_load_rng=False)
    cfg = types.SimpleNamespace(checkpoint=ck, model=model.cfg, moe=None)
    groups = types.SimpleNamespace(tp_rank=0, tp_size=1, dp_rank=0)
    scheduler = types.SimpleNamespace(load_state_dict=lambda sd: None)
    checkpointing.load_training_checkpoint(cfg, model, opt, scheduler, None, groups)
    assert torch.equal(model.rng_tracker.get_states()["cpu"], saved_tp)  # exact: a restored generator state
    assert torch.equal(torch.get_rng_state(), saved_global)


def test_pretrain_with_async_save_writes_the_synchronous_checkpoints(tiny_corpus, tmp_path):
    """pretrain_gpt.py --async-save: the same files, bitwise, as a synchronous run (interval saves written behind the
    following steps; the final one settled before pretrain returns)."""
    from megatron.training import pretrain
    from tests.conftest import tiny_train_argv

    def run(name, *extra):
        root = str(tmp_path / name)
        pretrain(tiny_train_argv(tiny_corpus, tmp_path, "--num-experts", "2", "--train-iters", "3",
                                 "--save-interval", "2", "--save", root, "--eval-iters", "0", *extra))
        return root

    sync, asyn = run("sync"), run("async", "--async-save")
    assert checkpointing.read_tracker(asyn) == 3
    for it in (2, 3):
        a, b = _files(checkpointing.iter_dir(sync, it)), _files(checkpointing.iter_dir(asyn, it))
        assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a), it
