"""Start-up device settings: the cuBLAS workspace under --deterministic, TF32 (--no-tf32), the distributed timeout
reaching every process group, the token-id scan before the data barrier, and the peak FLOP/s that MFU uses."""
import datetime
import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron import device_settings, flops, parallel_state, training
from tests.conftest import tiny_train_argv


# ----------------------------------------------------------------------------------------- --deterministic
def test_cublas_workspace_set_when_unset_and_said_once(caplog):
    env = {}
    with caplog.at_level(logging.INFO, logger="megatron"):
        line = device_settings.set_cublas_workspace(True, env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in line and line in caplog.text
    assert device_settings.set_cublas_workspace(True, env) is None  # already set: nothing to say


def test_cublas_workspace_keeps_the_users_value_and_needs_deterministic():
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    assert device_settings.set_cublas_workspace(True, env) is None and env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    env = {}
    assert device_settings.set_cublas_workspace(False, env) is None and env == {}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("extra,timeout,cublas", [([], 10.0, None),
                                                  (["--deterministic", "--distributed-timeout-minutes", "45"],
                                                   45.0, ":4096:8")])
def test_setup_sets_cublas_before_cuda_and_passes_the_timeout(tiny_corpus, tmp_path, monkeypatch, extra, timeout,
                                                              cublas):
    """setup_from_argv: CUBLAS_WORKSPACE_CONFIG is in the environment when init_distributed (which starts CUDA)
    runs, and --distributed-timeout-minutes reaches it."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = {}

    def fake_init(backend, timeout_minutes=None):
        import os
        seen["timeout"], seen["cublas"] = timeout_minutes, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        raise _Stop

    monkeypatch.setattr(parallel_state, "init_distributed", fake_init)
    with pytest.raises(_Stop):
        training.setup_from_argv(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", *extra))
    assert seen == {"timeout": timeout, "cublas": cublas}


# --------------------------------------------------------------------------------------------------- TF32
def test_tf32_setting_toggles_cuda_matmul_and_cudnn():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        device_settings.set_tf32(False)
        assert not device_settings.tf32_enabled() and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.get_float32_matmul_precision() == "highest"
        device_settings.set_tf32(True)
        assert device_settings.tf32_enabled() and torch.backends.cudnn.allow_tf32
        # both views readable (torch.compile and other libraries read them)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------- --distributed-timeout-minutes
def test_timeout_reaches_init_process_group_and_every_new_group(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["timeout"])))
    parallel_state.init_distributed("gloo", 45)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout=None: calls.append(("group", timeout)) or object())
    parallel_state.initialize(1, (1, 2), timeout_minutes=45)
    assert calls[0] == ("init", datetime.timedelta(minutes=45))
    assert len(calls) > 4 and all(t == datetime.timedelta(minutes=45) for _, t in calls)


def test_token_scan_runs_before_the_data_barrier(tmp_path, monkeypatch):
    """Every rank scans the token ids before it enters the start-up barrier (no rank waits in a collective while
    another scans)."""
    from megatron.data import GPTDataset, MMapIndexedDataset, MMapIndexedDatasetBuilder

    prefix = str(tmp_path / "ds")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in range(6):
        builder.add_item(list(range(d, d + 20)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    order = []
    original = GPTDataset._check_vocabulary
    monkeypatch.setattr(GPTDataset, "_check_vocabulary", lambda self, docs: order.append("scan") or
                        original(self, docs))
    GPTDataset("train", MMapIndexedDataset(prefix), np.arange(6), 10, 8, seed=1, cache_dir=str(tmp_path / "c"),
               barrier=lambda: order.append("barrier"), vocab_size=64)
    assert order == ["scan", "barrier"]


# -------------------------------------------------------------------------------------------------- MFU peak
@pytest.mark.parametrize("name,dtype,tf32,tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989.0),
    ("NVIDIA H200", torch.bfloat16, True, 989.0),
    ("NVIDIA H100 PCIe", torch.float16, True, 756.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, True, 312.0),
    ("NVIDIA L40S", torch.bfloat16, True, 362.05),
    ("NVIDIA L4", torch.bfloat16, True, 121.0),
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.5),  # fp32 GEMMs on TF32 tensor cores
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 67.0),  # --no-tf32: plain fp32
])
def test_peak_table_by_device_name_and_dtype(name, dtype, tf32, tflops):
    assert flops.table_peak_flops(name, dtype, tf32) == pytest.approx(tflops * 1e12)


def test_peak_flops_sources(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert flops.peak_flops(cuda, torch.bfloat16, True) == (989e12, "NVIDIA H100 80GB HBM3, dense bf16 peak "
                                                                     "(data sheet)")
    assert flops.peak_flops(cuda, torch.bfloat16, True, override=5e14) == (5e14, "--peak-flops")
    probes = []
    monkeypatch.setattr(flops, "measure_gemm_peak", lambda n=2048, repeats=5, device=None, dtype=torch.float32:
                        probes.append((device.type, dtype)) or 1e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    peak, source = flops.peak_flops(cuda, torch.bfloat16, True)
    assert peak == 1e12 and "measured bf16 GEMM" in source and "--peak-flops" in source
    assert flops.peak_flops(torch.device("cpu"), torch.bfloat16, True) == (1e12, "measured fp32 GEMM")
    assert probes == [("cuda", torch.bfloat16), ("cpu", torch.float32)]  # the CPU keeps its fp32 probe
