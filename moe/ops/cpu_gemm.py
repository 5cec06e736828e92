"""The CPU expert-GEMM fast path: MKL's batch GEMM called through ctypes (`batched_mm`, with a torch.mm loop as the
fallback on every other device and dtype) and `BufferRecycler`, which reuses large CPU buffers between steps.

Neither changes what is computed; both exist because CPU PyTorch pays per-call OpenMP and page-fault costs that a
GPU does not. `moe.experts` re-exports these names.
"""
from __future__ import annotations

import ctypes
import math
import os
from typing import Optional

import torch

# The CPU fast paths (the MKL batch GEMM call and BufferRecycler), on or off together. The default of
# GroupedMLPExperts(cpu_fast_paths=...); the environment variable MOE_CPU_FAST_PATHS=0, read once at import, turns
# both off process-wide (plain torch.mm loops and fresh allocations), e.g. to rule them out when chasing a
# numerical issue.
CPU_FAST_PATHS = os.environ.get("MOE_CPU_FAST_PATHS", "1") != "0"


class _MklBatch:
    """cblas_{s,d}gemm_batch from the MKL already linked into libtorch_cpu, called through ctypes.

    Why: per-expert torch.mm calls each open their own OpenMP region, and at ~64 rows per expert the
    fork/join cost (much worse when other processes share the cores) dominates; one batched call lets
    MKL run whole small GEMMs per thread. Used for fp32/fp64 CPU tensors when the symbols are exported;
    otherwise (CUDA, bf16, other builds) `batched_mm` falls back to a loop of torch.mm.
    """
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self):
        self.fns = {}
        self.verified: Optional[bool] = None  # the probe GEMM's verdict, made at first use
        if not CPU_FAST_PATHS:
            return
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        try:
            lib = ctypes.CDLL(path)
            for dtype, name in ((torch.float32, "cblas_sgemm_batch"), (torch.float64, "cblas_dgemm_batch")):
                fn = getattr(lib, name)
                fn.restype = None
                self.fns[dtype] = fn
        except (OSError, AttributeError):
            self.fns = {}

    def supports(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.dtype not in self.fns:
            return False
        if self.verified is None:
            self.verified = self._probe()
        return self.verified

    def _probe(self) -> bool:
        """Checks the ctypes interface (LP64 ints, row-major, transposes, beta) on small GEMMs against torch.mm;
        on any difference the MKL path is never used (a logged warning) instead of computing garbage."""
        gen = torch.Generator().manual_seed(0)
        try:
            for dtype in self.fns:
                for trans_a, trans_b, beta in ((False, True, 1.0), (True, False, 0.0), (False, False, 0.5)):
                    a = [torch.randn((7, 5) if trans_a else (5, 7), generator=gen, dtype=dtype) for _ in range(3)]
                    b = [torch.randn((6, 7) if trans_b else (7, 6), generator=gen, dtype=dtype) for _ in range(3)]
                    c = [torch.randn(5, 6, generator=gen, dtype=dtype) for _ in range(3)]
                    want = [(x.t() if trans_a else x) @ (y.t() if trans_b else y) + beta * z for x, y, z in zip(a, b, c)]
                    self(a, b, c, trans_a, trans_b, beta)
                    if not all(torch.allclose(g, w, rtol=1e-4, atol=1e-4) for g, w in zip(c, want)):
                        raise ValueError("results differ from torch.mm")
        except Exception as e:  # noqa: BLE001 - any failure of the foreign call means: do not use it
            import logging

            logging.getLogger(__name__).warning("MKL batch GEMM through ctypes failed its probe (%s); using torch.mm "
                                                "loops", e)
            return False
        return True

    def __call__(self, a_list, b_list, c_list, trans_a: bool, trans_b: bool, beta: float) -> None:
        g = len(c_list)
        ints, ptrs = ctypes.c_int * g, ctypes.c_void_p * g
        scal = (ctypes.c_float if c_list[0].dtype == torch.float32 else ctypes.c_double) * g
        m = [c.shape[0] for c in c_list]
        n = [c.shape[1] for c in c_list]
        k = [a.shape[0] if trans_a else a.shape[1] for a in a_list]
        self.fns[c_list[0].dtype](
            ctypes.c_int(self.ROW_MAJOR), ints(*[self.TRANS if trans_a else self.NO_TRANS] * g),
            ints(*[self.TRANS if trans_b else self.NO_TRANS] * g), ints(*m), ints(*n), ints(*k),
            scal(*[1.0] * g), ptrs(*[a.data_ptr() for a in a_list]), ints(*[a.stride(0) for a in a_list]),
            ptrs(*[b.data_ptr() for b in b_list]), ints(*[b.stride(0) for b in b_list]), scal(*[beta] * g),
            ptrs(*[c.data_ptr() for c in c_list]), ints(*[c.stride(0) for c in c_list]),
            ctypes.c_int(g), ints(*[1] * g))


_MKL_BATCH = _MklBatch()


def batched_mm(a_list, b_list, c_list, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0,
               use_mkl: Optional[bool] = None) -> None:
    """c_i = op(a_i) @ op(b_i) + beta * c_i for every i, in place (op = transpose when trans_*).

    All operands are row-major 2-D views (stride(1) == 1, e.g. row slices of one buffer) of one dtype.
    Groups with an empty dimension are skipped (c_i is zeroed when the reduction is empty and beta == 0).
    `use_mkl=None` picks the MKL batch call when it applies; False forces the torch.mm loop.
    """
    run = [i for i, (a, c) in enumerate(zip(a_list, c_list)) if c.numel() and a.numel()]
    for i, (a, c) in enumerate(zip(a_list, c_list)):
        if c.numel() and not a.numel() and beta == 0.0:
            c.zero_()
    if not run:
        return
    a_list, b_list, c_list = [a_list[i] for i in run], [b_list[i] for i in run], [c_list[i] for i in run]
    if use_mkl is None:
        use_mkl = _MKL_BATCH.supports(c_list[0])
    if use_mkl and all(t.stride(1) == 1 and t.stride(0) >= t.shape[1] for t in a_list + b_list + c_list):
        _MKL_BATCH(*_balanced_pieces(a_list, b_list, c_list, trans_a), trans_a, trans_b, beta)
        return  # (operands that are not row-major views take the torch.mm loop below)
    for a, b, c in zip(a_list, b_list, c_list):
        a, b = (a.t() if trans_a else a), (b.t() if trans_b else b)
        if beta == 0.0:
            torch.mm(a, b, out=c)
        else:
            c.addmm_(a, b, beta=beta)


def _storage_use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class BufferRecycler:
    """Hands out the memory of a previous step's large buffer again once nobody else holds it.

    Why: CPU PyTorch returns every large tensor to the OS when it dies (glibc mmap), so each step
    page-faults its big buffers back in: the stacked weight gradients (2 x 256 MiB at E=128, H=512,
    F=1024, freed by optimizer.zero_grad()) and the [N, F] activations cost ~60 ms per 256 MiB here,
    a third of the layer's ideal time at E=128. Per key we keep a second tensor on the last buffer's
    storage; when its storage use count is back to our own reference alone (the autograd graph
    released it, p.grad was set to None, and no one kept a view), the memory is reused, as a GPU
    caching allocator would. A buffer still referenced anywhere is never handed out. Autograd
    semantics are unchanged: backward still returns fresh tensor objects, which AccumulateGrad adopts
    as p.grad or adds into an existing p.grad. Cost: the largest buffers stay reserved between steps.
    """
    # private API: without it, plain allocation; CPU only (CUDA's caching allocator already reuses memory)
    enabled = CPU_FAST_PATHS and hasattr(torch._C, "_storage_Use_Count")
    SLACK = 1.25  # room to grow: the row count N varies with routing (untouched pages cost nothing)

    def __init__(self, enabled: Optional[bool] = None):
        if enabled is not None:  # else the class default (CPU_FAST_PATHS and the private API present)
            self.enabled = enabled and BufferRecycler.enabled
        self._cache = {}  # key -> (tensor sharing the storage, storage use count when only it holds it)

    def empty(self, key: str, shape, like: torch.Tensor) -> torch.Tensor:
        """A contiguous uninitialised tensor of `shape` with like's dtype and device."""
        shape = tuple(shape)
        numel = math.prod(shape)
        if not self.enabled or like.device.type != "cpu":
            return like.new_empty(shape)
        entry = self._cache.get(key)
        if entry is not None:
            held, free_count = entry
            if (held.dtype == like.dtype and held.device == like.device and held.numel() >= numel
                    and _storage_use_count(held) == free_count):
                return like.new_empty(0).set_(held.untyped_storage(), 0, shape, _contiguous_strides(shape))
        held = like.new_empty(max(int(numel * self.SLACK), 1))
        self._cache[key] = (held, _storage_use_count(held))
        return like.new_empty(0).set_(held.untyped_storage(), 0, shape, _contiguous_strides(shape))


def _contiguous_strides(shape):
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def _balanced_pieces(a_list, b_list, c_list, trans_a: bool):
    """Split the GEMMs along the rows of C into near-equal pieces when there are few large ones.

    MKL's batch call gives whole GEMMs to threads; with 8 experts of uneven row counts on 2 threads one
    thread would idle at the end. Rows of C are independent (C[m0:m1] needs rows m0:m1 of op(A) only),
    so pieces of >= 64 rows keep every GEMM efficient while the threads get equal work.
    """
    target_pieces = 8 * torch.get_num_threads()
    if len(c_list) >= target_pieces:
        return a_list, b_list, c_list
    piece = max(64, -(-sum(c.shape[0] for c in c_list) // target_pieces))
    pa, pb, pc = [], [], []
    for a, b, c in zip(a_list, b_list, c_list):
        m = c.shape[0]
        n_pieces = max(1, -(-m // piece))
        bounds = [m * j // n_pieces for j in range(n_pieces + 1)]
        for m0, m1 in zip(bounds[:-1], bounds[1:]):
            pa.append(a[:, m0:m1] if trans_a else a[m0:m1])
            pb.append(b)
            pc.append(c[m0:m1])
    return pa, pb, pc
