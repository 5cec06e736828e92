"""Model FLOPs per token (Megatron's accounting) and the peak FLOP/s MFU is taken against: the device's dense
tensor-core peak for the compute dtype on a known GPU, a measured GEMM peak elsewhere, or --peak-flops."""
import re
import time
from typing import Optional, Tuple

import torch

from megatron.config import ModelConfig


def flops_per_token(cfg: ModelConfig, moe_cfg=None, training: bool = True) -> float:
    """Matmul FLOPs per token of one forward (x3 for forward+backward when training).

    Counts QKV/projection/MLP GEMMs (active experts only: topk per token, plus the router; Residual-MoE
    adds its dense MLP and mixing coefficient), attention scores and context over the full sequence
    (Megatron's convention, no causal halving) and the LM head.
    """
    h, f, s, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.seq_length, cfg.padded_vocab_size
    total = 0.0
    plan = moe_cfg.layer_plan(cfg.num_layers) if moe_cfg is not None else (None,) * cfg.num_layers
    for layer in range(cfg.num_layers):
        total += 2 * 4 * h * h  # QKV (3h^2) + output projection (h^2)
        total += 2 * 2 * s * h  # QK^T and attention x V
        if plan[layer] is not None:
            n_exp = plan[layer].num_experts
            fe = moe_cfg.moe_ffn_hidden_size or f
            total += moe_cfg.topk * 2 * 2 * h * fe + 2 * h * n_exp  # active experts + router
            if moe_cfg.mlp_type == "residual":
                total += 2 * 2 * h * f + 2 * h * 2  # Residual-MoE: dense MLP + 2-way mixing coefficient
        else:
            total += 2 * 2 * h * f
    total += 2 * h * v  # LM head
    return total * (3.0 if training else 1.0)


def measure_gemm_peak(n: int = 2048, repeats: int = 5, device=None, dtype=torch.float32) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on this device with the current thread count."""
    device = torch.device(device or "cpu")
    # a private generator: the probe runs before training and must not move the global RNG streams that
    # dropout draws from (a resumed run, which restores them, would otherwise diverge from a straight one)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's data sheets: (name pattern, bf16/fp16, tf32, fp32). The first
# pattern that matches torch.cuda.get_device_name() wins, so the more specific names come first.
_PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0, 378.0, 51.2),
    (r"H100 NVL", 835.0, 417.5, 60.0),
    (r"\bG?H100\b|\bH800\b|\bG?H200\b", 989.0, 494.5, 67.0),  # SXM: H100 80GB HBM3, H200, GH200
    (r"\bA100\b|\bA800\b", 312.0, 156.0, 19.5),
    (r"\bL40S\b", 362.05, 183.0, 91.6),
    (r"\bL40\b", 181.05, 90.5, 90.5),
    (r"\bL4\b", 121.0, 60.0, 30.3),
    (r"\bA10\b", 125.0, 62.5, 31.2),
)


def table_peak_flops(device_name: str, compute_dtype: torch.dtype, tf32: bool) -> Optional[float]:
    """Dense peak FLOP/s of a GPU named `device_name` for GEMMs in `compute_dtype` (fp32: the TF32 peak when TF32
    is allowed, else plain fp32); None for a GPU not in the table."""
    for pattern, half, tf32_peak, fp32 in _PEAK_TFLOPS:
        if re.search(pattern, device_name):
            if compute_dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            return (tf32_peak if tf32 else fp32) * 1e12
    return None


def peak_flops(device: torch.device, compute_dtype: torch.dtype, tf32: bool,
               override: Optional[float] = None) -> Tuple[float, str]:
    """(peak FLOP/s per device for MFU, where it comes from): --peak-flops when given; on CUDA the table's dense peak
    for the compute dtype (a GPU not in it: a measured GEMM peak in that dtype); on the CPU a measured fp32 GEMM
    peak (the probe runs at the thread count training uses)."""
    if override:
        return override, "--peak-flops"
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, "tf32" if tf32 else "fp32")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak_flops(name, compute_dtype, tf32)
        if peak is not None:
            return peak, f"{name}, dense {dtype_name} peak (data sheet)"
        return (measure_gemm_peak(4096, device=device, dtype=compute_dtype),
                f"measured {dtype_name} GEMM on {name} (not in megatron/flops.py's table; pass --peak-flops)")
    return measure_gemm_peak(device=device), "measured fp32 GEMM"
