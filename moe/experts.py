"""The experts of one rank: stacked MLPs computed by one grouped-GEMM autograd Function, or copies of a user
expert module; the one dense MLP (`MLP`) and activation they share with the model; the expert-parallel tags.

Shape legend: N rows (tokens grouped by local expert, expert i owns rows [off_i, off_i + n_i)),
D hidden, F ffn hidden, e local experts.
"""
from __future__ import annotations

import copy
import ctypes
import math
import os
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def is_expert_param(p: torch.Tensor) -> bool:
    """True for parameters owned by expert-parallel ranks (reduced over expert-DP, saved per expert)."""
    return bool(getattr(p, "expert_parallel", False))


def _tag_stacked(p: nn.Parameter, num_local_experts: int) -> None:
    p.expert_parallel = True
    p.num_local_experts = num_local_experts


# The CPU fast paths (the MKL batch GEMM call and BufferRecycler), on or off together: MOE_CPU_FAST_PATHS=0 turns
# both off (plain torch.mm loops and fresh allocations), e.g. to rule them out when chasing a numerical issue.
CPU_FAST_PATHS = os.environ.get("MOE_CPU_FAST_PATHS", "1") != "0"


def _offsets(counts: Sequence[int]) -> List[int]:
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    return offsets


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

    def __init__(self):
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


# GELU variants by name (MoEConfig / ModelConfig `activation`) -> aten's `approximate` argument. 'gelu_tanh' is
# Megatron's default (its fused bias-GeLU is the tanh approximation); 'gelu' is the exact erf form. 'swiglu' is
# gated (Shazeer 2020, Megatron-LM's --swiglu): the first projection has 2F rows [gate; up] and the activation is
# silu(gate) * up, [.., 2F] -> [.., F].
_APPROXIMATE = {"gelu_tanh": "tanh", "gelu": "none"}
GATED = ("swiglu",)


def activation_fn(name: str):
    """The activation called `name` as a function of one tensor (the dense MLP and every expert use it)."""
    if name == "swiglu":
        return lambda x: _swiglu(*x.chunk(2, dim=-1))
    approximate = _APPROXIMATE[name]
    return lambda x: F.gelu(x, approximate=approximate)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _act_forward(activation: str, h_NH: torch.Tensor, new) -> torch.Tensor:
    """a_NF = act(h_NH) into a buffer from `new` (H = F, or 2F for a gated activation)."""
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return torch.mul(F.silu(gate), up, out=new("a", up.shape, h_NH))
    return torch.ops.aten.gelu.out(h_NH, approximate=_APPROXIMATE[activation], out=new("a", h_NH.shape, h_NH))


def _act_backward(activation: str, da_NF: torch.Tensor, h_NH: torch.Tensor, new) -> torch.Tensor:
    """dL/dh from dL/da. swiglu: d gate = da · up · σ(g)(1 + g(1 − σ(g))), d up = da · silu(g)."""
    dh_NH = new("dh", h_NH.shape, h_NH)
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        d_gate, d_up = dh_NH.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        torch.mul(da_NF, gate * sig, out=d_up)
        torch.mul(da_NF * up, sig * (1 + gate * (1 - sig)), out=d_gate)
        return dh_NH
    return torch.ops.aten.gelu_backward.grad_input(da_NF, h_NH, approximate=_APPROXIMATE[activation],
                                                   grad_input=dh_NH)


# The expert GEMM seam (torchtitan's `_grouped_mm` shape): 'auto' runs torch._grouped_mm (one kernel for all
# experts) on CUDA where it exists and the operands fit its rules, else `batched_mm` (the MKL batch call on CPU,
# a loop of torch.mm elsewhere); 'on' forces the grouped kernel wherever it runs (torch 2.13 also has a CPU
# implementation, slower than MKL's batch call here, used by the tests to check this same code path against the
# loop); 'off' never uses it. Tests and benchmarks set moe.experts.GROUPED_MM.
GROUPED_MM = os.environ.get("MOE_GROUPED_MM", "auto")


def _grouped_mm_ok(x_ND: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: fp32/bf16/fp16, rows 16-byte aligned (its stride rule)."""
    if GROUPED_MM == "off" or not hasattr(torch, "_grouped_mm"):
        return False
    if GROUPED_MM == "auto" and x_ND.device.type != "cuda":
        return False
    if x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per16 = 16 // x_ND.element_size()
    return all(d % per16 == 0 for d in w.shape[1:])


def _gmm(a, b, offs):
    """torch._grouped_mm; offs: int32 cumulative group ends over the grouped dimension."""
    return torch._grouped_mm(a, b, offs=offs)


class _GroupedMLP(torch.autograd.Function):
    """y_i = act(x_i W1_i^T + b1_i) W2_i^T + b2_i for every local expert i, forward and backward.

    One Function instead of per-expert autograd ops: each of the six GEMM stages (2 forward, 4 backward)
    is one grouped call over all experts: torch._grouped_mm where the seam picks it (GROUPED_MM: one kernel per
    stage on CUDA), else one batched call writing straight into slices of one buffer (no per-expert graph nodes,
    no W[i] indexing inside autograd, which would make backward materialise a full-size [e, ...] gradient per
    expert). Only real rows are computed: an expert's GEMMs have exactly its row count, so empty capacity costs
    nothing. Biases: gathered per row and used as the GEMM's C (beta = 1) in forward; their gradients are
    [1, n_i] x [n_i, D] GEMMs with a ones row. Large buffers (activations, weight gradients) come from the
    layer's BufferRecycler when one is passed.
    """

    @staticmethod
    def forward(ctx, x_ND, counts, w1_eFD, b1_eF, w2_eDF, b2_eD, recycler, activation):
        offsets = _offsets(counts)
        e, num_rows = len(counts), x_ND.shape[0]
        new = _allocator(recycler)
        x_ND = x_ND.contiguous()
        expert_N = torch.repeat_interleave(torch.arange(e, device=x_ND.device),
                                           torch.tensor(counts, device=x_ND.device), output_size=num_rows)
        rows = [slice(offsets[i], offsets[i + 1]) for i in range(e)]
        grouped = _grouped_mm_ok(x_ND, w1_eFD) and _grouped_mm_ok(x_ND, w2_eDF)  # (swiglu: w1 has 2F rows, w2 F)
        offs = torch.tensor(offsets[1:], dtype=torch.int32, device=x_ND.device) if grouped else None
        if grouped:
            h_NF = _gmm(x_ND, w1_eFD.transpose(1, 2), offs).add_(b1_eF.index_select(0, expert_N))
        else:
            h_NF = torch.index_select(b1_eF, 0, expert_N, out=new("h", (num_rows, w1_eFD.shape[1]), x_ND))
            batched_mm([x_ND[r] for r in rows], list(w1_eFD), [h_NF[r] for r in rows], trans_b=True, beta=1.0)
        a_NF = _act_forward(activation, h_NF, new)
        if grouped:
            y_ND = _gmm(a_NF, w2_eDF.transpose(1, 2), offs).add_(b2_eD.index_select(0, expert_N))
        else:
            y_ND = torch.index_select(b2_eD, 0, expert_N, out=new("y", (num_rows, w2_eDF.shape[1]), x_ND))
            batched_mm([a_NF[r] for r in rows], list(w2_eDF), [y_ND[r] for r in rows], trans_b=True, beta=1.0)
        ctx.rows, ctx.recycler, ctx.activation, ctx.offs = rows, recycler, activation, offs
        ctx.save_for_backward(x_ND, h_NF, a_NF, w1_eFD, w2_eDF)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, h_NF, a_NF, w1_eFD, w2_eDF = ctx.saved_tensors
        if ctx.offs is not None:
            return _GroupedMLP._backward_grouped(ctx, dy_ND.contiguous(), x_ND, h_NF, a_NF, w1_eFD, w2_eDF)
        rows = ctx.rows
        dy_ND = dy_ND.contiguous()
        need_dx, _, need_w1, need_b1, need_w2, need_b2, _, _ = ctx.needs_input_grad
        new = _allocator(ctx.recycler)
        dw1 = new("dw1", w1_eFD.shape, w1_eFD) if need_w1 else None
        dw2 = new("dw2", w2_eDF.shape, w2_eDF) if need_w2 else None
        db1 = db2 = dx_ND = None
        dys = [dy_ND[r] for r in rows]
        if need_w2:
            batched_mm(dys, [a_NF[r] for r in rows], list(dw2), trans_a=True)
        if need_b2:
            db2 = _row_sums(dys, dy_ND)
        da_NF = new("da", a_NF.shape, h_NF)
        batched_mm(dys, list(w2_eDF), [da_NF[r] for r in rows])
        dh_NF = _act_backward(ctx.activation, da_NF, h_NF, new)
        del da_NF
        dhs = [dh_NF[r] for r in rows]
        if need_w1:
            batched_mm(dhs, [x_ND[r] for r in rows], list(dw1), trans_a=True)
        if need_b1:
            db1 = _row_sums(dhs, dh_NF)
        if need_dx:
            dx_ND = new("dx", x_ND.shape, x_ND)
            batched_mm(dhs, list(w1_eFD), [dx_ND[r] for r in rows])
        return dx_ND, None, dw1, db1, dw2, db2, None, None

    @staticmethod
    def _backward_grouped(ctx, dy_ND, x_ND, h_NF, a_NF, w1_eFD, w2_eDF):
        """backward with torch._grouped_mm: weight gradients as dY_i^T X_i grouped over rows, bias gradients as
        segment sums (index_add over the expert id of each row)."""
        need_dx, _, need_w1, need_b1, need_w2, need_b2, _, _ = ctx.needs_input_grad
        offs, e = ctx.offs, w1_eFD.shape[0]
        expert_N = torch.repeat_interleave(torch.arange(e, device=x_ND.device),
                                           torch.tensor([r.stop - r.start for r in ctx.rows], device=x_ND.device),
                                           output_size=x_ND.shape[0])
        dw2 = _gmm(dy_ND.t(), a_NF, offs) if need_w2 else None
        db2 = dy_ND.new_zeros(e, dy_ND.shape[1]).index_add_(0, expert_N, dy_ND) if need_b2 else None
        da_NF = _gmm(dy_ND, w2_eDF, offs)
        dh_NF = _act_backward(ctx.activation, da_NF, h_NF, _allocator(None))
        dw1 = _gmm(dh_NF.t(), x_ND, offs) if need_w1 else None
        db1 = dh_NF.new_zeros(e, dh_NF.shape[1]).index_add_(0, expert_N, dh_NF) if need_b1 else None
        dx_ND = _gmm(dh_NF, w1_eFD, offs) if need_dx else None
        return dx_ND, None, dw1, db1, dw2, db2, None, None


def _allocator(recycler: Optional["BufferRecycler"]):
    if recycler is None:
        return lambda key, shape, like: like.new_empty(tuple(shape))
    return recycler.empty


def _row_sums(blocks, like_ND: torch.Tensor) -> torch.Tensor:
    """[e, D] column sums of each block (bias gradients) as one batched [1, n_i] x [n_i, D] GEMM."""
    ones_1N = like_ND.new_ones(1, max(max(b.shape[0] for b in blocks), 1))
    out_eD = like_ND.new_empty(len(blocks), like_ND.shape[1])
    batched_mm([ones_1N[:, :b.shape[0]] for b in blocks], blocks, [out_eD[i:i + 1] for i in range(len(blocks))])
    return out_eD


def grouped_mlp(x_ND, counts: Sequence[int], w1_eFD, b1_eF, w2_eDF, b2_eD,
                recycler: Optional[BufferRecycler] = None, activation: str = "gelu_tanh") -> torch.Tensor:
    """Apply expert i's MLP to its `counts[i]` consecutive rows of x_ND; differentiable."""
    return _GroupedMLP.apply(x_ND, tuple(int(n) for n in counts), w1_eFD, b1_eF, w2_eDF, b2_eD, recycler,
                             activation)


def expert_rows_forward_(x_nD: torch.Tensor, w1_FD, b1_F, w2_DF, b2_D, h_nF: torch.Tensor,
                         y_nD: torch.Tensor, activation: str = "gelu_tanh") -> None:
    """y_nD = act(x_nD w1^T + b1) w2^T + b2 for ONE expert's rows, written in place (h_nF is scratch).

    Forward only (inference). Each expert is its own GEMM call with pieces cut from its own rows, so an
    expert's output depends only on its rows and weights: not on which other experts run, in which order,
    in which call, or where its weights live (the stacked parameter or an offload cache slot). That is what
    makes NVMe-offloaded inference (moe/offload) bitwise equal to the all-resident model, which runs this
    same function (grouped_mlp_inference). The MKL batch call, by contrast, gives last-bit differences when
    the batch's composition changes.
    """
    n = x_nD.shape[0]
    if n == 0:
        return
    if h_nF.shape[1] != w1_FD.shape[0]:  # a gated activation's [gate; up] rows: 2F scratch columns
        h_nF = x_nD.new_empty(n, w1_FD.shape[0])
    h_nF.copy_(b1_F.expand(n, b1_F.shape[0]))
    batched_mm([x_nD], [w1_FD], [h_nF], trans_b=True, beta=1.0)
    if activation == "swiglu":  # silu(gate) * up written over the gate half: a row-major [n, F] view
        gate, up = h_nF.chunk(2, dim=-1)
        a_nF = F.silu(gate, inplace=True).mul_(up)
    else:
        a_nF = torch.ops.aten.gelu_(h_nF, approximate=_APPROXIMATE[activation])
    y_nD.copy_(b2_D.expand(n, b2_D.shape[0]))
    batched_mm([a_nF], [w2_DF], [y_nD], trans_b=True, beta=1.0)


def grouped_mlp_inference(x_ND: torch.Tensor, counts: Sequence[int], w1_eFD, b1_eF, w2_eDF,
                          b2_eD, activation: str = "gelu_tanh") -> torch.Tensor:
    """grouped_mlp's forward without autograd, one expert at a time (see expert_rows_forward_); [N, D]."""
    offsets = _offsets(counts)
    x_ND = x_ND.contiguous()
    y_ND = x_ND.new_empty(x_ND.shape[0], w2_eDF.shape[1])
    h_NF = x_ND.new_empty(x_ND.shape[0], w1_eFD.shape[1])
    for i in range(len(counts)):
        r = slice(offsets[i], offsets[i + 1])
        expert_rows_forward_(x_ND[r], w1_eFD[i], b1_eF[i], w2_eDF[i], b2_eD[i], h_NF[r], y_ND[r], activation)
    return y_ND


def _default_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default


class MLP(nn.Module):
    """The one dense MLP: x -> dense_4h_to_h(act(dense_h_to_4h(x))), D -> F -> D (biases unless bias=False;
    a gated activation's dense_h_to_4h has 2F rows [gate; up], as Megatron-LM's fused linear_fc1).

    Used as is for the Residual-MoE branch and as the base of the model's ParallelMLP (megatron/model/mlp.py),
    which passes tensor-parallel linears; a built-in expert (GroupedMLPExperts) computes this same function,
    so one expert equals this module with the same weights. Default linears: nn.Linear, then `init_method` /
    `output_layer_init_method` (fill a weight in place) when given; biases start at zero. Dense parameters.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu_tanh",
                 init_method: Optional[Callable] = None, output_layer_init_method: Optional[Callable] = None,
                 dense_h_to_4h: Optional[nn.Module] = None, dense_4h_to_h: Optional[nn.Module] = None,
                 bias: bool = True):
        super().__init__()
        self.activation = activation
        self._act = activation_fn(activation)
        if dense_h_to_4h is None:
            width = 2 * ffn_hidden_size if activation in GATED else ffn_hidden_size  # swiglu: [gate; up]
            dense_h_to_4h = nn.Linear(hidden_size, width, bias=bias)
            dense_4h_to_h = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
            out_init = output_layer_init_method or init_method
            with torch.no_grad():
                if init_method is not None:
                    init_method(dense_h_to_4h.weight)
                if out_init is not None:
                    out_init(dense_4h_to_h.weight)
                if bias:
                    dense_h_to_4h.bias.zero_()
                    dense_4h_to_h.bias.zero_()
        self.dense_h_to_4h, self.dense_4h_to_h = dense_h_to_4h, dense_4h_to_h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self._act(self.dense_h_to_4h(x)))


class GroupedMLPExperts(nn.Module):
    """e MLP experts (D -> F -> D, with biases; the function of `MLP`) held as stacked weights, dim 0 = expert.

    Weights use nn.Linear's [out, in] layout per expert (w1_eFD[i] is expert i's dense_h_to_4h weight), so
    `init_method` / `output_layer_init_method` (fill a tensor in place) are applied to each expert's
    slice and every expert has exactly that distribution. Biases start at zero (Megatron). No
    communication. forward(x_ND, counts): expert i takes the counts[i] consecutive rows after
    expert i-1's; returns [N, D]. `activation`: 'gelu_tanh', 'gelu' or 'swiglu' (activation_fn; swiglu's w1_eFD
    has 2F rows per expert, [gate; up]). bias=False (--disable-bias-linear) freezes the biases at zero.

    Under expert parallelism (`num_experts` global experts, this rank holding `first_expert` ...
    `first_expert + num_local_experts - 1`) every rank draws the weights of all global experts in
    order and keeps its own: EP ranks get distinct experts (not copies of one rank's draws), the
    model equals the EP=1 model from the same seed, and the modules built afterwards see the same
    generator state at any EP size.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 init_method: Optional[Callable] = None, output_layer_init_method: Optional[Callable] = None,
                 first_expert: int = 0, num_experts: Optional[int] = None, activation: str = "gelu_tanh",
                 bias: bool = True):
        super().__init__()
        e, D, F_ = num_local_experts, hidden_size, ffn_hidden_size
        F1 = 2 * F_ if activation in GATED else F_  # swiglu: w1 holds [gate; up], the grouped GEMM stays one
        total = num_experts if num_experts is not None else e
        if not 0 <= first_expert <= total - e:
            raise ValueError(f"local experts {first_expert}..{first_expert + e - 1} are outside 0..{total - 1}")
        self.num_local_experts, self.activation = e, activation
        self.w1_eFD = nn.Parameter(torch.empty(e, F1, D))
        self.b1_eF = nn.Parameter(torch.zeros(e, F1))
        self.w2_eDF = nn.Parameter(torch.empty(e, D, F_))
        self.b2_eD = nn.Parameter(torch.zeros(e, D))
        with torch.no_grad():
            w1, w2 = torch.empty_like(self.w1_eFD[0]), torch.empty_like(self.w2_eDF[0])
            for g in range(total):
                (init_method or _default_init)(w1)
                (output_layer_init_method or init_method or _default_init)(w2)
                if first_expert <= g < first_expert + e:
                    self.w1_eFD[g - first_expert].copy_(w1)
                    self.w2_eDF[g - first_expert].copy_(w2)
        for p in self.parameters():
            _tag_stacked(p, e)
        if not bias:  # --disable-bias-linear: the biases stay zero (frozen), so the stacked layout is kept
            self.b1_eF.requires_grad_(False)
            self.b2_eD.requires_grad_(False)
        self.recycler = BufferRecycler()  # (not `buffers`: that would shadow nn.Module.buffers())

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x_ND.requires_grad or self.w1_eFD.requires_grad)):
            # inference (no_grad / inference_mode / frozen): the per-expert path that offload matches bitwise
            return grouped_mlp_inference(x_ND, counts, self.w1_eFD, self.b1_eF, self.w2_eDF, self.b2_eD,
                                         self.activation)
        return grouped_mlp(x_ND, counts, self.w1_eFD, self.b1_eF, self.w2_eDF, self.b2_eD, self.recycler,
                           self.activation)


class ModuleExperts(nn.Module):
    """e deep copies of a user `expert` module (DeepSpeed style), each applied to its own rows.

    Each copy's parameters are tagged expert_parallel=True, local_expert_index=i and
    num_local_experts=e.
    """

    def __init__(self, expert: nn.Module, num_local_experts: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_local_experts))
        for i, module in enumerate(self.experts):
            for p in module.parameters():
                p.expert_parallel = True
                p.local_expert_index = i
                p.num_local_experts = num_local_experts

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        chunks = torch.split(x_ND, [int(n) for n in counts], dim=0)
        outs = []
        for module, chunk in zip(self.experts, chunks):
            if chunk.shape[0] == 0:
                outs.append(chunk)
                continue
            out = module(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)  # DeepSpeed accepts (out, bias) experts
        return torch.cat(outs, dim=0)
