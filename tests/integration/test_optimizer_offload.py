"""Expert Adam state on NVMe in training (--moe-offload-optimizer nvme): the same training, bit for bit, as the
in-memory AdamW (the reference is torch.optim.AdamW itself, run by the normal path); one-line errors for bad
directories and full disks; a failed write-back. (Exact resume and checkpoint interchange with the in-memory
optimizer: tests/integration/test_resume_exactness.py.)

Every equality here is exact (torch.equal): fp32 on CPU, the same kernels on the same element slices, so any
difference is a bug, not rounding.
"""
import contextlib
import math
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

import moe.gating
from megatron import checkpointing
from megatron.ds_config import offload_args_from_ds_config
from megatron.errors import ConfigError
from megatron.training import build_model, pretrain, set_seed
from moe.offload.config import OptimizerOffloadConfig
from moe.offload.store import OffloadError
from tests.conftest import tiny_train_argv

MOE = ["--num-experts", "4", "--expert-interval", "1", "--topk", "1", "--clip-grad", "0.05", "--log-interval", "1",
       "--weight-decay", "0.1", "--eval-iters", "0"]
STARVED = 3  # the expert no token is routed to


@contextlib.contextmanager
def starve_expert(expert: int = STARVED):
    """Routes no token to `expert` (its router logit pushed far down), so its gradient rows are zero."""
    original = moe.gating.router_logits

    def logits(x_TD, weight_ED, jitter, **kwargs):
        out = original(x_TD, weight_ED, jitter, **kwargs)
        return out - 1e4 * (torch.arange(out.shape[-1], device=out.device) == expert).to(out.dtype)

    moe.gating.router_logits = logits
    try:
        yield
    finally:
        moe.gating.router_logits = original


def expert_adam_state(st) -> dict:
    """{param name: {step, exp_avg, exp_avg_sq}} of every expert parameter, stacked over the local experts, read
    from wherever the optimizer keeps it."""
    out = {}
    opt = st.optimizer
    for moe_idx, prefix, layer in checkpointing.moe_layers(st.model):
        e = layer.num_local_experts
        for name in checkpointing.expert_param_names(st.model, prefix):
            p = dict(st.model.named_parameters())[name]
            if opt.offloads_expert_state:
                per = [opt.expert_state(moe_idx, layer.ep_rank * e + i)[name[len(prefix) + 1:]] for i in range(e)]
                out[name] = {"step": per[0]["step"], "exp_avg": torch.stack([s["exp_avg"] for s in per]),
                             "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in per])}
            else:
                out[name] = {k: v.clone() for k, v in opt.state[p].items()}
    return out


def train_and_capture(argv, capsys):
    with starve_expert():
        r = pretrain(argv)
    out = capsys.readouterr().out
    st = r["state"]
    return st, out


def assert_same_training(a, b):
    (st_a, out_a), (st_b, out_b) = a, b
    for (n, p), (_, q) in zip(st_a.model.named_parameters(), st_b.model.named_parameters()):
        assert torch.equal(p, q), n
    sa, sb = expert_adam_state(st_a), expert_adam_state(st_b)
    assert sorted(sa) == sorted(sb) and sa
    for n in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[n][k], sb[n][k]), (n, k)
    dense = {n: st_a.optimizer.state[p] for n, p in st_a.model.named_parameters() if n not in sa}
    for n, p in st_b.model.named_parameters():
        if n in dense:
            assert dense[n]
            for k, v in dense[n].items():
                assert torch.equal(v, st_b.optimizer.state[p][k]), (n, k)
    losses = lambda out: re.findall(r"lm loss: (\S+)", out)  # noqa: E731
    assert losses(out_a) == losses(out_b) and len(losses(out_a)) == 10


def test_ten_steps_offloaded_equal_in_memory(tiny_corpus, tmp_path, capsys):
    argv = tiny_train_argv(tiny_corpus, tmp_path, *MOE, "--train-iters", "10")
    ref = train_and_capture(argv, capsys)
    off = train_and_capture(argv + ["--moe-offload-optimizer", "nvme", "--moe-offload-dir", str(tmp_path / "off")],
                            capsys)
    assert_same_training(ref, off)
    # the swap behind the next forward (a thread of its own; each MoE layer waits for its experts) is the same run
    behind = train_and_capture(argv + ["--moe-offload-optimizer", "nvme", "--moe-offload-dir", str(tmp_path / "off2"),
                                       "--moe-offload-overlap"], capsys)
    assert behind[0].optimizer.optimizer.overlap and not off[0].optimizer.optimizer.overlap
    assert_same_training(ref, behind)
    behind[0].optimizer.close()
    st, out = off
    # clipping acted on every step, and the starved expert got no token yet was stepped (weight decay, moments)
    norms = [float(x) for x in re.findall(r"grad norm: (\S+)", out)]
    assert len(norms) == 10 and min(norms) > 0.05
    layer = st.model.layers[0].mlp
    w = layer.experts.w1_eFD
    assert torch.count_nonzero(w.grad[STARVED]) == 0 and torch.count_nonzero(w.grad[0]) > 0
    assert expert_adam_state(st)["layers.0.mlp.experts.w1_eFD"]["step"].item() == 10
    # its moments stay 0, so AdamW moved its weights by weight decay alone: w_10 = w_0 * prod_t (1 - lr_t * wd)
    # (lr as logged, 4 digits: rtol 1e-3)
    set_seed(st.cfg.data.seed)
    w0 = build_model(st.cfg, st.groups, torch.device("cpu")).layers[0].mlp.experts.w1_eFD.detach()
    shrink = math.prod(1 - float(lr) * 0.1 for lr in re.findall(r"learning rate: (\S+)", out))
    assert shrink < 0.9999 and torch.allclose(w[STARVED], w0[STARVED] * shrink, rtol=1e-3, atol=0)
    # swap statistics were logged, and only the buffers are resident
    assert re.search(r"offload: read [\d.]+ MB .* wrote [\d.]+ MB .* swap exposed", out)
    opt = st.optimizer
    assert opt.optimizer.swapper.resident_bytes == 4 * opt.optimizer.store.record_bytes
    assert not any(p in opt.state for p in (w, layer.experts.b1_eF))


def _main(argv, capsys):
    """pretrain_gpt.py's main() in this process: (exit code, stderr lines that are not log lines)."""
    from megatron.training import main

    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    return code, err


def test_failed_write_back_is_one_line_and_leaves_the_last_checkpoint(tiny_corpus, tmp_path, capsys, monkeypatch):
    """An I/O error from the write handle in the middle of step 5's write-back (MOE_OFFLOAD_FAULT: the 18th record
    write; 4 experts x 1 MoE layer per step) stops training with one line, exit 2; the checkpoint of step 3 is
    the tracker's and loads: training resumes from it."""
    from moe.offload import store

    argv = tiny_train_argv(tiny_corpus, tmp_path, "--num-experts", "4", "--train-iters", "6", "--save-interval", "3",
                           "--save", str(tmp_path / "ck"), "--moe-offload-optimizer", "nvme", "--moe-offload-dir",
                           str(tmp_path / "off"), "--eval-iters", "0")
    monkeypatch.setenv(store.FAULT_ENV, "write:18")
    monkeypatch.setattr(store, "_fault_writes", 0)
    code, err = _main(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert re.fullmatch(r"error: .*experts\.bin: writing the optimizer state of MoE layer 0 expert 1 .*injected I/O "
                        r"error.*resume from the last checkpoint with --load", err[0]), err
    assert checkpointing.read_tracker(str(tmp_path / "ck")) == 3
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000003", checkpointing.TRACKER]
    monkeypatch.delenv(store.FAULT_ENV)
    code, err = _main(argv + ["--load", str(tmp_path / "ck")], capsys)
    assert code == 0 and not err and checkpointing.read_tracker(str(tmp_path / "ck")) == 6


def test_bad_offload_directories_are_one_line(tiny_corpus, tmp_path, capsys):
    ck = tmp_path / "ck"
    argv = lambda d, n="4": tiny_train_argv(tiny_corpus, tmp_path, "--num-experts", n, "--train-iters", "2",  # noqa
                                            "--save", str(ck), "--moe-offload-optimizer", "nvme",
                                            "--moe-offload-dir", str(d))
    other = tmp_path / "other"
    assert _main(argv(other, "2"), capsys) == (0, [])
    assert (other / "rank_00000" / "manifest.json").is_file()
    shutil.rmtree(ck)
    # a store of another run (another expert count) is refused, naming its manifest
    code, err = _main(argv(other), capsys)
    assert code == 2 and len(err) == 1 and f"{other}/rank_00000/manifest.json: left by another run" in err[0], err
    # a directory holding something else
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    code, err = _main(argv(foreign), capsys)
    assert code == 2 and len(err) == 1 and f"--moe-offload-dir {foreign}: holds other files (notes.txt)" in err[0]
    # a directory that cannot be created (a file is in the way)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _main(argv(blocker / "sub"), capsys)
    assert code == 2 and len(err) == 1 and f"--moe-offload-dir {blocker / 'sub'}: cannot create" in err[0], err
    assert not ck.exists()  # the refused runs wrote nothing
    # a mount point's lost+found is not in the way (DeepSpeed's nvme_path is usually the mount itself)
    mount = tmp_path / "mount"
    (mount / "lost+found").mkdir(parents=True)
    assert _main(argv(mount, "2"), capsys) == (0, [])
    assert sorted(os.listdir(mount)) == ["lost+found", "rank_00000"]
    shutil.rmtree(ck)
    # offload of a dense model is a flag error
    code, err = _main(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "2", "--moe-offload-optimizer", "nvme",
                                      "--moe-offload-dir", str(tmp_path / "x")), capsys)
    assert code == 2 and len(err) == 1 and "the model is dense" in err[0], err


def test_resume_reads_expert_state_one_file_at_a_time_and_failed_setup_frees_the_directory(tiny_corpus, tmp_path,
                                                                                            capsys, monkeypatch):
    """Resuming with offload keeps no expert's Adam state in the payloads it verifies (each file's state is re-read
    into the store on its own, so memory holds one expert's state at a time, never all of them); a run that fails
    while setting up (a checkpoint of another attention-head count) releases its offload directory: the next run in the same
    process uses it."""
    ck, off = tmp_path / "ck", tmp_path / "off"
    argv = lambda *x: tiny_train_argv(tiny_corpus, tmp_path, "--num-experts", "4", "--train-iters", "4",  # noqa
                                      "--save", str(ck), "--moe-offload-optimizer", "nvme", "--moe-offload-dir",
                                      str(off), "--eval-iters", "0", *x)
    assert _main(argv("--exit-interval", "2"), capsys) == (0, [])
    kept, reads = [], []
    real_read, real_load = checkpointing.read_expert_files, checkpointing.load_checkpoint_file
    monkeypatch.setattr(checkpointing.experts, "read_expert_files",
                        lambda *a, **k: kept.append(real_read(*a, **k)) or kept[-1])
    monkeypatch.setattr(checkpointing.integrity, "load_checkpoint_file",
                        lambda d, path, **k: reads.append(os.path.basename(path)) or real_load(d, path, **k))
    assert _main(argv("--load", str(ck)), capsys) == (0, [])
    assert len(kept) == 1 and len(kept[0]) == 4 and all("optimizer" not in p for p in kept[0].values())
    experts = [f for f in reads if f.startswith("layer_")]
    assert len(experts) == 8 and sorted(set(experts)) == sorted(experts[:4])  # verified, then re-read one by one
    monkeypatch.undo()
    from megatron.errors import CheckpointError
    from megatron.training import setup_from_argv

    with pytest.raises(CheckpointError, match="num_attention_heads") as failed:  # the same expert layout
        setup_from_argv(argv("--load", str(ck), "--num-attention-heads", "8"))
    # `failed` keeps the failed setup's frames (and its optimizer) alive, as a caller's traceback would: without the
    # release the store's lock would still be held ("in use by another running process")
    assert _main(argv("--load", str(ck)), capsys) == (0, [])
    del failed


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a full disk) needs root")
def test_full_disk_and_read_only_directory(tiny_corpus, tmp_path, capsys):
    ck = tmp_path / "ck"
    argv = lambda d: tiny_train_argv(tiny_corpus, tmp_path, "--num-experts", "4", "--train-iters", "2",  # noqa
                                     "--save", str(ck), "--moe-offload-optimizer", "nvme", "--moe-offload-dir", str(d))
    for name, opts, expect in (("small", "size=64k", "reserving"), ("ro", "size=1m,ro", "cannot create")):
        mnt = tmp_path / name
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        try:
            code, err = _main(argv(mnt / "opt"), capsys)
            assert code == 2 and len(err) == 1 and f"--moe-offload-dir {mnt / 'opt'}" in err[0] and expect in err[0]
            if name == "small":  # 4 experts' state (~0.3 MB) cannot be reserved in 64 KiB; nothing is left behind
                assert "the disk is full" in err[0]
                assert os.listdir(mnt / "opt" / "rank_00000") == ["lock"]
        finally:
            subprocess.run(["umount", str(mnt)])
    assert not ck.exists()


def test_deepspeed_config_blocks_map_onto_the_flags():
    from megatron.arguments import optimizer_offload_config_from_args, parse_args

    zero = {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme/opt", "buffer_count": 6,
                                              "pin_memory": True, "pipeline_read": True, "pipeline_write": False}}
    aio = {"block_size": 262144, "queue_depth": 8, "single_submit": True, "overlap_events": True,
           "thread_count": 2}
    dests = offload_args_from_ds_config(zero, aio)
    args = parse_args(["--num-layers", "2"])
    for k, v in dests.items():
        assert hasattr(args, k), k  # every mapped key is a pretrain_gpt.py argparse dest
        setattr(args, k, v)
    assert optimizer_offload_config_from_args(args) == OptimizerOffloadConfig(
        mode="nvme", directory="/nvme/opt", buffer_count=6, pipeline=True, aio_block_size=262144,
        aio_queue_depth=8,
        aio_single_submit=True, aio_overlap_events=True, aio_intra_op_parallelism=2)
    assert offload_args_from_ds_config({"offload_optimizer": {"device": "nvme", "nvme_path": "/x",
                                                              "pipeline_read": False, "pipeline_write": False}},
                                       None)["moe_offload_pipeline"] is False
    assert offload_args_from_ds_config({"stage": 1}, None) == {}
    for zero, aio, match in (({"offload_optimizer": {"device": "cpu"}}, None, 'device "cpu" is not supported'),
                             ({"offload_optimizer": {"device": "nvme"}}, None, 'needs "nvme_path"'),
                             ({"offload_optimizer": {"device": "nvme", "nvme_path": "/x", "ratio": 0.3}}, None,
                              "ratio"),
                             ({"offload_optimizer": {"device": "nvme", "nvme_path": "/x", "bogus": 1}}, None,
                              r"unknown key\(s\) \['bogus'\]"),
                             ({}, {"use_gds": True}, "use_gds"),
                             ({"offload_optimizer": {"device": "nvme", "nvme_path": "/x", "buffer_count": "four"}},
                              None, r"offload_optimizer\.buffer_count \('four'\) must be an integer"),
                             ({"offload_optimizer": {"device": "nvme", "nvme_path": "/x", "ratio": None}}, None,
                              r"offload_optimizer\.ratio \(None\) must be a number"),
                             ({"offload_optimizer": {"device": "nvme", "nvme_path": "/x", "pipeline_read": True,
                                                     "pipeline_write": "yes"}}, None,
                              r"offload_optimizer\.pipeline_write \('yes'\) must be true or false"),
                             ({"offload_optimizer": {"device": "nvme", "nvme_path": 5}}, None, "nvme_path must be"),
                             ({}, {"block_size": "1M"}, r"aio\.block_size \('1M'\) must be an integer"),
                             ({}, {"single_submit": 1}, r"aio\.single_submit \(1\) must be true or false")):
        with pytest.raises(ConfigError, match=match):  # megatron/ds_config.py reads every DeepSpeed JSON key
            offload_args_from_ds_config(zero, aio)


def test_swapper_pipelined_and_serial_apply_every_update_once(tmp_path, monkeypatch):
    """The swap pipeline against a plain in-memory copy of the records: 3 rounds of a key-dependent update, with 1,
    2 and 4 buffers, pipelined and not, leave exactly the expected bytes; a write that fails mid-round raises one
    OffloadError (no hang) and that record reads as corrupted until rewritten."""
    from moe.offload import store
    from moe.offload.swap import StateSwapper

    layout = [(m, e, {"a": ((e + 3, 5), torch.float32), "b": ((7,), torch.float32)}) for m in range(2) for e in range(3)]
    for buffers in (1, 2, 4):
        for pipeline in (True, False):
            st, lock = store.open_training_store(str(tmp_path / f"s{buffers}{pipeline}"), 0, layout, {"run": 1})
            sw = StateSwapper(st, buffers, {"block_size": 4096, "queue_depth": 4}, pipeline=pipeline)
            expected = {(m, e): {n: torch.zeros(shape) for n, (shape, _) in t.items()} for m, e, t in layout}
            seen = []

            def update(key, views):
                seen.append(key)
                for n, v in views.items():
                    v.mul_(0.5).add_(key[0] * 10 + key[1] + torch.arange(v.numel()).view(v.shape))

            for _ in range(3):
                sw.run(st.keys(), update)
                for key, t in expected.items():
                    for n, v in t.items():
                        v.mul_(0.5).add_(key[0] * 10 + key[1] + torch.arange(v.numel()).view(v.shape))
            assert seen == st.keys() * 3
            for key, t in expected.items():
                got = sw.read(key)
                assert all(torch.equal(got[n], v) for n, v in t.items()), key
            assert sw.stats.bytes_read == 3 * st.total_bytes()  # 3 rounds (checkpoint reads are not step traffic)
            assert sw.stats.bytes_written == 3 * st.total_bytes() and sw.resident_bytes == min(buffers, 6) * 4096
            assert sw.stats.steps == 3
            lock.close()
    monkeypatch.setenv(store.FAULT_ENV, "write:3")
    monkeypatch.setattr(store, "_fault_writes", 0)
    with pytest.raises(OffloadError, match=r"MoE layer 0 expert 2 .*injected I/O error"):
        sw.run(st.keys(), update)
    with pytest.raises(OffloadError, match=r"checksum mismatch in the record of MoE layer 0 expert 2"):
        sw.read((0, 2))
    monkeypatch.delenv(store.FAULT_ENV)


@pytest.mark.parametrize("fail", ["update", "read", "write"])
def test_swapper_pipeline_stops_on_any_failure_without_hanging(tmp_path, monkeypatch, fail):
    """Pipelined, 3 buffers: an exception from the update, a read error (a corrupted record) or a write error in the
    middle of a round reaches the caller as itself; both I/O threads have stopped; the store is usable again."""
    import threading

    from moe.offload import store
    from moe.offload.swap import StateSwapper

    layout = [(0, e, {"a": ((64,), torch.float32)}) for e in range(8)]
    st, lock = store.open_training_store(str(tmp_path / "s"), 0, layout, {"run": 1})
    sw = StateSwapper(st, 3, {"block_size": 4096, "queue_depth": 4}, pipeline=True)
    sw.run(st.keys(), lambda key, views: views["a"].add_(1))

    def update(key, views):
        if fail == "update" and key == (0, 4):
            raise ValueError("update failed")
        views["a"].add_(1)

    if fail == "read":  # record 5's bytes changed behind the store's back: its checksum no longer matches
        with open(st.data_path, "r+b") as f:
            f.seek(st.records[(0, 5)].offset)
            f.write(b"\xff" * 8)
    if fail == "write":
        monkeypatch.setenv(store.FAULT_ENV, "write:4")
        monkeypatch.setattr(store, "_fault_writes", 0)
    expect = {"update": (ValueError, "update failed"), "read": (OffloadError, "checksum mismatch .* expert 5"),
              "write": (OffloadError, "expert 3 .*injected I/O error")}[fail]
    with pytest.raises(expect[0], match=expect[1]):
        sw.run(st.keys(), update)
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-offload-swap")]
    monkeypatch.delenv(store.FAULT_ENV, raising=False)
    sw.write((0, 5), {"a": torch.zeros(64)})  # a failed record is usable once rewritten
    sw.write((0, 3), {"a": torch.zeros(64)})
    sw.run(st.keys(), lambda key, views: views["a"].add_(1))
    assert torch.equal(sw.read((0, 5))["a"], torch.ones(64))
    lock.close()


@pytest.mark.parametrize("overlap", [False, True], ids=["in-step", "overlap"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the record is staged on the GPU for the update)"))])
def test_moe_layer_offloaded_equals_torch_adamw(tmp_path, device, overlap, monkeypatch):
    """A bare MoE layer (on CPU; on the GPU the record is staged on the device): 3 steps with the expert state
    offloaded equal torch.optim.AdamW's in memory (weights, every expert's exp_avg / exp_avg_sq). With overlap the
    step returns with the swap still in flight, and what the training loop does next (a new learning rate, gradients
    zeroed in place, the next forward) must not change it."""
    from megatron.config import OptimizerConfig
    from megatron.optimizer import build_optimizer
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    def run(offload):
        torch.manual_seed(0)
        layer = MoELayer(32, 64, 4, MoEConfig(num_experts=(4,), expert_interval=1)).to(device)
        layer.layer_index = 0
        opt = build_optimizer(layer, OptimizerConfig(lr=1e-2, weight_decay=0.1), offload=offload)
        if offload is not None and overlap:  # slow reads: the step surely is still in flight when the loop goes on
            read = opt.optimizer.swapper._read
            monkeypatch.setattr(opt.optimizer.swapper, "_read", lambda *a, **k: (time.sleep(0.05), read(*a, **k)))
        x = torch.randn(64, 32, device=device)
        for step in range(3):
            opt.zero_grad(set_to_none=False)
            layer(x)[0].pow(2).mean().backward()
            opt.step()
            if offload is not None and overlap:
                assert opt.optimizer._inflight is not None  # the expert step went on behind this thread
            for g in opt.param_groups:  # a scheduler's step: the next update's rate, not the one in flight
                g["lr"] = 1e-2 / (step + 2)
        if offload is not None:
            opt.synchronize()
        return layer, opt

    ref, ref_opt = run(None)
    off, opt = run(OptimizerOffloadConfig(mode="nvme", directory=str(tmp_path / "off"), overlap=overlap))
    for (n, p), (_, q) in zip(ref.named_parameters(), off.named_parameters()):
        assert torch.equal(p, q), n
    for e in range(4):
        for name, p in ref.experts.named_parameters():
            got, want = opt.expert_state(0, e)[f"experts.{name}"], ref_opt.state[p]
            assert torch.equal(got["step"], want["step"])
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got[k], want[k][e]), (e, name, k)
    opt.close()


def test_overlapped_step_error_is_raised_at_the_next_forward(tmp_path, monkeypatch):
    """A write-back failing behind the training thread surfaces as its OffloadError where the training thread next
    waits for the swap: the next forward's MoE layer if the layer was not yet stepped, else synchronize() (the
    training loop's settle, or the next step()); close() afterwards releases the directory."""
    from megatron.config import OptimizerConfig
    from megatron.optimizer import build_optimizer
    from moe.config import MoEConfig
    from moe.layer import MoELayer
    from moe.offload import store as store_mod

    torch.manual_seed(0)
    layer = MoELayer(32, 64, 4, MoEConfig(num_experts=(4,), expert_interval=1))
    layer.layer_index = 0
    off = OptimizerOffloadConfig(mode="nvme", directory=str(tmp_path / "off"), overlap=True)
    opt = build_optimizer(layer, OptimizerConfig(lr=1e-2), offload=off)
    x = torch.randn(64, 32)
    monkeypatch.setenv(store_mod.FAULT_ENV, "write:3")
    monkeypatch.setattr(store_mod, "_fault_writes", 0)
    layer(x)[0].pow(2).mean().backward()
    opt.step()
    with pytest.raises(OffloadError, match="writing the optimizer state of MoE layer 0 expert 2"):
        layer(x)
        opt.synchronize()
    layer(x)  # the error was reported once; nothing is in flight any more
    opt.synchronize()
    opt.close()
    OptimizerOffloadConfig(mode="nvme", directory=str(tmp_path / "off"))  # and the directory is free again
    build_optimizer(layer, OptimizerConfig(lr=1e-2), offload=off).close()
