"""The expert-GEMM seam (torchtitan's `_grouped_mm` shape): when torch._grouped_mm (one kernel for all experts) runs
an expert stage, and the call itself.

Modes (GroupedMLPExperts(grouped_mm=...), default GROUPED_MM):
- 'auto': the grouped kernel on CUDA in bf16 on sm90+ only. That is its fast path (CUTLASS); for fp32 on CUDA
  torch falls back to a per-expert loop that first copies `offs` to the host (a sync), and its meta kernel (what
  `torch.compile` traces) accepts bf16 only, so an fp32 call would fail at trace time; below sm90 torch's own
  fallback loops over experts after the same host copy. Everything else (CPU, fp32, older GPUs)
  takes `moe.ops.cpu_gemm.batched_mm` (MKL's batch call on CPU, a torch.mm loop elsewhere).
- 'on': the grouped kernel wherever it runs (torch 2.13 has a CPU kernel too, slower than MKL's batch call here);
  tests use it to check the grouped code path against the loop on CPU.
- 'off': never.
Operand rule (the kernel's stride check): every row of every operand 16-byte aligned, i.e. D and F multiples of
16 / element size (8 in bf16).
"""
from __future__ import annotations

import os

import torch

GROUPED_MM_MODES = ("auto", "on", "off")
# The default mode; the environment variable MOE_GROUPED_MM, read once at import, overrides it process-wide.
GROUPED_MM = os.environ.get("MOE_GROUPED_MM", "auto")


def grouped_mm_ok(x_ND: torch.Tensor, w: torch.Tensor, mode: str = "auto") -> bool:
    """Whether the expert GEMMs of x_ND [N, D] with stacked weights w [e, F, D] run as torch._grouped_mm in `mode`.

    Both operands must already be in the compute dtype (the caller casts)."""
    if mode == "off" or not hasattr(torch, "_grouped_mm"):
        return False
    if x_ND.dtype != w.dtype:
        return False
    if mode == "auto":
        if x_ND.device.type != "cuda" or x_ND.dtype != torch.bfloat16:
            return False
        if torch.cuda.get_device_capability(x_ND.device) < (9, 0):  # below sm90 torch loops (and syncs) itself
            return False
    elif x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x_ND.device.type == "meta" and \
            x_ND.dtype != torch.bfloat16:  # the meta kernel takes bf16 only
        return False
    per16 = 16 // x_ND.element_size()
    return all(d % per16 == 0 for d in w.shape[1:])


def gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm; offs: int32 cumulative group ends over the grouped dimension, on a's device."""
    return torch._grouped_mm(a, b, offs=offs)
