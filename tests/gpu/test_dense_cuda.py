"""The dense GPU path on a real GPU: the fused LM losses (bytes-sized chunks, no host sync), TF32 and
--deterministic settings, a 1-rank NCCL group for the collectives the code uses, and the bf16 training step's host
syncs counted by CUDA itself (torch.cuda.set_sync_debug_mode)."""
import datetime
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import device_settings, flops
from megatron.model.fused_lm_loss import DistillTarget, fused_lm_cross_entropy, fused_lm_kd_loss
from megatron.tensor_parallel import cross_entropy as ce
from tests.conftest import ROOT


def _no_syncs():
    """A context under which any synchronising CUDA op raises."""
    class _Ctx:
        def __enter__(self):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode("default")
            return False
    return _Ctx()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_on_cuda_equals_float64_without_syncs(dtype):
    torch.manual_seed(0)
    n, v, h = 3000, 50304, 64
    hidden = torch.randn(1, n, h, device="cuda", requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * 0.1).requires_grad_()
    labels = torch.randint(0, v, (1, n), device="cuda")
    assert ce.rows_per_chunk(torch.empty(n, v, device="cuda")) == ce.GPU_CHUNK_BYTES // (v * 4)
    with _no_syncs():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = fused_lm_cross_entropy(hidden, weight, labels)
        loss.sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    if dtype == torch.bfloat16:  # the reference sees the same bf16-rounded GEMM inputs
        h64, w64 = (hidden.detach().bfloat16().double().requires_grad_(),
                    weight.detach().bfloat16().double().requires_grad_())
    ref = F.cross_entropy((h64 @ w64.t())[0], labels[0], reduction="none")
    ref.sum().backward()
    # fp32 / TF32 GEMM (10-bit mantissa inputs under TF32) and bf16 GEMMs with fp32 accumulation: loose on logits
    tol = 2e-2 if dtype == torch.bfloat16 or device_settings.tf32_enabled() else 1e-4
    torch.testing.assert_close(loss[0].double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=tol * 5, atol=tol)


def test_fused_kd_loss_on_cuda_has_no_syncs():
    torch.manual_seed(0)
    b, s, h, v = 2, 512, 64, 50304
    hidden = torch.randn(b, s, h, device="cuda", requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * 0.1).requires_grad_()
    labels = torch.randint(0, v, (b, s), device="cuda")
    teacher = torch.randn(b, s, v, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(b, s, device="cuda")
    with _no_syncs():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, _, _ = fused_lm_kd_loss(hidden, weight, labels, DistillTarget(teacher, mask, 2.0, 0.5, 0.5, 50257))
        total.backward()
    assert torch.isfinite(total).item() and torch.isfinite(hidden.grad).all().item()


def test_tf32_setting_changes_fp32_matmul_precision():
    a = torch.randn(1024, 1024, device="cuda")
    b = torch.randn(1024, 1024, device="cuda")
    ref = a.double() @ b.double()
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        device_settings.set_tf32(False)
        ieee = (a @ b).double().sub(ref).abs().max().item()
        device_settings.set_tf32(True)
        tf32 = (a @ b).double().sub(ref).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert tf32 > 10 * ieee  # TF32's 10-bit mantissa inputs vs IEEE fp32


def test_deterministic_needs_and_gets_the_cublas_workspace():
    """In a fresh process (cuBLAS reads the variable when it starts): without it, deterministic mode refuses the
    first cuBLAS GEMM; device_settings.apply sets it first and the GEMM runs."""
    code = ("import os, torch; from megatron import device_settings\n"
            "if os.environ.get('APPLY') == '1': device_settings.apply(True, True)\n"
            "else: torch.use_deterministic_algorithms(True)\n"
            "a = torch.randn(64, 64, device='cuda'); print((a @ a).sum().item())\n")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env["PYTHONPATH"] = ROOT
    bare = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "CUBLAS_WORKSPACE_CONFIG" in bare.stderr
    env["APPLY"] = "1"
    fixed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr


def test_device_is_in_the_peak_table_or_says_how_to_set_it():
    name = torch.cuda.get_device_name()
    peak, source = flops.peak_flops(torch.device("cuda"), torch.bfloat16, True)
    print(f"{name}: {peak / 1e12:.1f} TFLOP/s bf16 ({source})")
    assert peak > 0 and (flops.table_peak_flops(name, torch.bfloat16, True) is not None or "--peak-flops" in source)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_nccl_group_runs_the_collectives_the_code_uses():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=2), device_id=torch.device("cuda", 0))
    try:
        g = dist.new_group([0], timeout=datetime.timedelta(minutes=2))
        x = torch.arange(8.0, device="cuda")
        dist.all_reduce(x, group=g)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=g)
        out = torch.empty(8, device="cuda")
        dist.all_gather_into_tensor(out, x, group=g)
        rs = torch.empty(8, device="cuda")
        dist.reduce_scatter_tensor(rs, x, group=g)
        a2a = torch.empty(8, device="cuda", dtype=torch.bfloat16)
        dist.all_to_all_single(a2a, x.bfloat16(), [8], [8], group=g)  # the EP dispatch: split sizes, bf16
        dist.broadcast(x, 0, group=g)
        dist.barrier(group=g, device_ids=[0])
        torch.cuda.synchronize()
        assert torch.equal(out, torch.arange(8.0, device="cuda")) and torch.equal(a2a.float(), x)
    finally:
        dist.destroy_process_group()


def test_bf16_dense_training_step_host_syncs_counted_by_cuda():
    """One bf16 step of a small dense GPT on the GPU under set_sync_debug_mode('warn'): the syncs are at most the
    two known sites of megatron/training.py's step (tests/unit/test_gpu_audit_dense.py lists them)."""
    from megatron import parallel_state
    from megatron.arguments import parse_args, train_config_from_args
    from megatron.training import setup_train_state, train_step

    argv = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
            "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "4", "--bf16"]
    st = setup_train_state(train_config_from_args(parse_args(argv), 512), parallel_state.initialize(1, (1,)),
                           torch.device("cuda", torch.cuda.current_device()))
    g = torch.Generator().manual_seed(0)
    it = iter(lambda: {"text": torch.randint(0, 512, (4, 129), generator=g).pin_memory()}, None)
    train_step(st, it)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(st, it)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    print(f"host syncs in one bf16 dense step: {len(syncs)}")
    assert len(syncs) <= 2, syncs
