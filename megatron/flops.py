"""Model FLOPs per token (Megatron's accounting) and a measured fp32 GEMM peak for MFU."""
import time

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
