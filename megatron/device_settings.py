"""Process-wide device settings applied once at start-up: TF32 for fp32 matmuls on CUDA and deterministic
algorithms, with the cuBLAS workspace setting they need (the process groups' timeout is parallel_state's)."""
from __future__ import annotations

import logging
import os
from typing import MutableMapping, Optional

import torch

log = logging.getLogger("megatron")

# cuBLAS is only deterministic with a fixed workspace (CUDA docs, "Results reproducibility"); without the variable,
# torch.use_deterministic_algorithms(True) raises at the first cuBLAS call. Read when cuBLAS creates its handle.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_cublas_workspace(deterministic: bool, environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """--deterministic: sets CUBLAS_WORKSPACE_CONFIG=:4096:8 when it is unset (a user's own value is kept). Call before
    CUDA is initialised. Returns the log line it wrote, or None when it changed nothing."""
    env = os.environ if environ is None else environ
    if not deterministic or env.get("CUBLAS_WORKSPACE_CONFIG"):
        return None
    env["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    line = (f"> --deterministic: CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE_CONFIG} set (cuBLAS needs a fixed "
            f"workspace for deterministic results; set the variable yourself to choose another)")
    log.info(line)
    return line


def set_tf32(allowed: bool) -> None:
    """fp32 matmuls and cuDNN convolutions on CUDA: TF32 tensor cores when `allowed` (the default, as Megatron-LM
    runs in NVIDIA's containers: 10-bit mantissa inputs, fp32 accumulation) or IEEE fp32 (--no-tf32). Affects only
    fp32 GEMMs: under --bf16/--fp16 the GEMMs already run in the compute dtype. No effect on the CPU.
    Through the per-backend allow_tf32 flags: torch >= 2.9 also has fp32_precision, but once that is set to "tf32",
    torch.get_float32_matmul_precision() and the allow_tf32 getters (read by torch.compile and other libraries)
    raise; the flags set both views consistently."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def tf32_enabled() -> bool:
    """Whether fp32 CUDA matmuls run on TF32 tensor cores (the peak MFU is taken against)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def apply(tf32: bool, deterministic: bool) -> None:
    """The settings of a run (TrainConfig.tf32, .deterministic): TF32, deterministic algorithms (and the cuBLAS
    workspace, when CUDA has not read it yet)."""
    set_cublas_workspace(deterministic)
    set_tf32(tf32)
    if deterministic:
        torch.use_deterministic_algorithms(True)

