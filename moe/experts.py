"""The experts of one rank: stacked MLPs computed by one grouped-GEMM autograd Function, or copies of a user
expert module; the one dense MLP (`MLP`) and activation they share with the model. The CPU GEMM fast path lives in
moe/ops/cpu_gemm.py, the grouped-GEMM seam in moe/ops/grouped_mm.py and the expert-parallel tags in moe/tagging.py
(their public names are re-exported here).

Precision: every expert GEMM runs in the compute dtype (`compute_dtype`): the autocast dtype when autocast is on for
the input's device (bf16 under --bf16, whatever the input: CUDA's LayerNorm hands fp32 to the MoE layer), else the
weights' dtype. Inputs and weights are cast explicitly, since autocast does not reach into the custom autograd
Function or the out=/in-place GEMMs; gradients come back in each input's own dtype (fp32 master weights).

Shape legend: N rows (tokens grouped by local expert, expert i owns rows [off_i, off_i + n_i)),
D hidden, F ffn hidden, e local experts.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


from moe.ops.cpu_gemm import (CPU_FAST_PATHS, BufferRecycler, _balanced_pieces, _MKL_BATCH,  # noqa: F401
                              _MklBatch, batched_mm)
from moe.ops.grouped_mm import GROUPED_MM_MODES, gmm as _gmm, grouped_mm_ok
from moe.ops import grouped_mm as _grouped_mm_seam
from moe.tagging import is_expert_param, tag_module_expert, tag_stacked as _tag_stacked  # noqa: F401

# The default grouped-GEMM mode of experts built with grouped_mm=None (see moe/ops/grouped_mm.py; env
# MOE_GROUPED_MM). Read at each forward, so tests and benchmarks may set moe.experts.GROUPED_MM.
GROUPED_MM = _grouped_mm_seam.GROUPED_MM


def _offsets(counts: Sequence[int]) -> List[int]:
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    return offsets


def _grouped_mm_ok(x_ND: torch.Tensor, w: torch.Tensor, mode: Optional[str] = None) -> bool:
    return grouped_mm_ok(x_ND, w, GROUPED_MM if mode is None else mode)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: the autocast dtype when autocast is on for x's device (as nn.Linear under
    autocast; fp64 weights stay fp64, which autocast never lowers), else the weights' dtype."""
    if weight.dtype != torch.float64 and _autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _no_autocast(device_type: str):
    """Autocast off for the explicit-dtype code inside (it would re-cast the GEMMs it reaches)."""
    if not _autocast_on(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _expert_ids(counts: Sequence[int], counts_e: Optional[torch.Tensor], num_rows: int, device) -> torch.Tensor:
    """[N] local expert id of each row. From the device counts when given (no host->device copy: no sync on
    CUDA); else from the host list (a tiny host->device copy: free on CPU, a sync on CUDA)."""
    e = len(counts)
    if counts_e is None:
        counts_e = torch.tensor(counts, device=device)
    return torch.repeat_interleave(torch.arange(e, device=device), counts_e, output_size=num_rows)


def _group_ends(offsets: Sequence[int], counts_e: Optional[torch.Tensor], device) -> torch.Tensor:
    """int32 cumulative row ends per expert (torch._grouped_mm's offs), from the device counts when given."""
    if counts_e is None:
        return torch.tensor(offsets[1:], dtype=torch.int32, device=device)
    return torch.cumsum(counts_e, 0, dtype=torch.int32)

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
    """dL/dh from dL/da. swiglu: d gate = da · up · σ(g)(1 + g(1 − σ(g))) (aten's fused silu_backward), d up =
    da · silu(g): four passes over [N, F], where the unfused formula took nine (the CPU step is memory-bound there)."""
    dh_NH = new("dh", h_NH.shape, h_NH)
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        d_gate, d_up = dh_NH.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(da_NF * up, gate, grad_input=d_gate)
        torch.mul(da_NF, F.silu(gate), out=d_up)
        return dh_NH
    return torch.ops.aten.gelu_backward.grad_input(da_NF, h_NH, approximate=_APPROXIMATE[activation],
                                                   grad_input=dh_NH)



class _GroupedMLP(torch.autograd.Function):
    """y_i = act(x_i W1_i^T + b1_i) W2_i^T + b2_i for every local expert i, forward and backward.

    One Function instead of per-expert autograd ops: each of the six GEMM stages (2 forward, 4 backward)
    is one grouped call over all experts: torch._grouped_mm where the seam picks it (one kernel per stage on CUDA in
    bf16), else one batched call writing straight into slices of one buffer (no per-expert graph nodes,
    no W[i] indexing inside autograd, which would make backward materialise a full-size [e, ...] gradient per
    expert). Only real rows are computed: an expert's GEMMs have exactly its row count. Biases: gathered per row
    and used as the GEMM's C (beta = 1) in forward; their gradients are [1, n_i] x [n_i, D] GEMMs with a ones row.
    Large buffers (activations, weight gradients) come from the layer's BufferRecycler when one is passed.
    Precision: everything inside runs in `dtype` with autocast off (grouped_mlp sets both); each gradient is
    returned in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x_ND, counts, counts_e, w1_eFD, b1_eF, w2_eDF, b2_eD, recycler, activation, dtype, mode,
                use_mkl):
        offsets = _offsets(counts)
        num_rows = x_ND.shape[0]
        new = _allocator(recycler)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x_ND, w1_eFD, b1_eF, w2_eDF, b2_eD))
        x_ND = x_ND.to(dtype).contiguous()
        # b1_eF / b2_eD None: no biases (--disable-bias-linear), the GEMMs write their outputs (beta 0)
        w1_eFD, b1_eF, w2_eDF, b2_eD = (None if t is None else t.to(dtype) for t in (w1_eFD, b1_eF, w2_eDF, b2_eD))
        expert_N = _expert_ids(counts, counts_e, num_rows, x_ND.device)
        rows = [slice(offsets[i], offsets[i + 1]) for i in range(len(counts))]
        grouped = grouped_mm_ok(x_ND, w1_eFD, mode) and grouped_mm_ok(x_ND, w2_eDF, mode)  # swiglu: w1 2F rows
        offs = _group_ends(offsets, counts_e, x_ND.device) if grouped else None
        if grouped:
            h_NF = _gmm(x_ND, w1_eFD.transpose(1, 2), offs)
            if b1_eF is not None:
                h_NF.add_(b1_eF.index_select(0, expert_N))
        else:
            h_NF = _bias_rows(b1_eF, expert_N, new("h", (num_rows, w1_eFD.shape[1]), x_ND))
            batched_mm([x_ND[r] for r in rows], list(w1_eFD), [h_NF[r] for r in rows], trans_b=True,
                       beta=0.0 if b1_eF is None else 1.0, use_mkl=use_mkl)
        a_NF = _act_forward(activation, h_NF, new)
        if grouped:
            y_ND = _gmm(a_NF, w2_eDF.transpose(1, 2), offs)
            if b2_eD is not None:
                y_ND.add_(b2_eD.index_select(0, expert_N))
        else:
            y_ND = _bias_rows(b2_eD, expert_N, new("y", (num_rows, w2_eDF.shape[1]), x_ND))
            batched_mm([a_NF[r] for r in rows], list(w2_eDF), [y_ND[r] for r in rows], trans_b=True,
                       beta=0.0 if b2_eD is None else 1.0, use_mkl=use_mkl)
        ctx.rows, ctx.recycler, ctx.activation, ctx.offs, ctx.use_mkl = rows, recycler, activation, offs, use_mkl
        ctx.save_for_backward(x_ND, h_NF, a_NF, w1_eFD, w2_eDF, expert_N if grouped else None)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, h_NF, a_NF, w1_eFD, w2_eDF, expert_N = ctx.saved_tensors
        with _no_autocast(dy_ND.device.type):
            dy_ND = dy_ND.to(x_ND.dtype).contiguous()
            if ctx.offs is not None:
                grads = _GroupedMLP._backward_grouped(ctx, dy_ND, x_ND, h_NF, a_NF, w1_eFD, w2_eDF, expert_N)
            else:
                grads = _GroupedMLP._backward_loop(ctx, dy_ND, x_ND, h_NF, a_NF, w1_eFD, w2_eDF)
        # each gradient in its input's dtype (fp32 master weights, the caller's activation dtype)
        dx, dw1, db1, dw2, db2 = (None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))
        return dx, None, None, dw1, db1, dw2, db2, None, None, None, None, None

    @staticmethod
    def _backward_loop(ctx, dy_ND, x_ND, h_NF, a_NF, w1_eFD, w2_eDF):
        rows, use_mkl = ctx.rows, ctx.use_mkl
        need_dx, _, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:7]
        new = _allocator(ctx.recycler)
        dw1 = new("dw1", w1_eFD.shape, w1_eFD) if need_w1 else None
        dw2 = new("dw2", w2_eDF.shape, w2_eDF) if need_w2 else None
        db1 = db2 = dx_ND = None
        dys = [dy_ND[r] for r in rows]
        if need_w2:
            batched_mm(dys, [a_NF[r] for r in rows], list(dw2), trans_a=True, use_mkl=use_mkl)
        if need_b2:
            db2 = _row_sums(dys, dy_ND, use_mkl)
        da_NF = new("da", a_NF.shape, h_NF)
        batched_mm(dys, list(w2_eDF), [da_NF[r] for r in rows], use_mkl=use_mkl)
        dh_NF = _act_backward(ctx.activation, da_NF, h_NF, new)
        del da_NF
        dhs = [dh_NF[r] for r in rows]
        if need_w1:
            batched_mm(dhs, [x_ND[r] for r in rows], list(dw1), trans_a=True, use_mkl=use_mkl)
        if need_b1:
            db1 = _row_sums(dhs, dh_NF, use_mkl)
        if need_dx:
            dx_ND = new("dx", x_ND.shape, x_ND)
            batched_mm(dhs, list(w1_eFD), [dx_ND[r] for r in rows], use_mkl=use_mkl)
        return dx_ND, dw1, db1, dw2, db2

    @staticmethod
    def _backward_grouped(ctx, dy_ND, x_ND, h_NF, a_NF, w1_eFD, w2_eDF, expert_N):
        """backward with torch._grouped_mm: weight gradients as dY_i^T X_i grouped over rows; bias gradients as
        grouped GEMMs with a ones operand (fp32 accumulation inside the kernel, deterministic, unlike an
        index_add_ of bf16 rows)."""
        need_dx, _, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:7]
        offs = ctx.offs
        dw2 = _gmm(dy_ND.t(), a_NF, offs) if need_w2 else None
        db2 = _grouped_row_sums(dy_ND, offs) if need_b2 else None
        da_NF = _gmm(dy_ND, w2_eDF, offs)
        dh_NF = _act_backward(ctx.activation, da_NF, h_NF, _allocator(None))
        dw1 = _gmm(dh_NF.t(), x_ND, offs) if need_w1 else None
        db1 = _grouped_row_sums(dh_NF, offs) if need_b1 else None
        dx_ND = _gmm(dh_NF, w1_eFD, offs) if need_dx else None
        return dx_ND, dw1, db1, dw2, db2


def _bias_rows(b_eF: Optional[torch.Tensor], expert_N: torch.Tensor, out_NF: torch.Tensor) -> torch.Tensor:
    """out_NF filled with each row's expert bias (the GEMM's C, beta 1); without biases left as it is (beta 0)."""
    return out_NF if b_eF is None else torch.index_select(b_eF, 0, expert_N, out=out_NF)


def _grouped_row_sums(d_ND: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[e, D] per-expert column sums of d_ND's row groups as one grouped GEMM [8, N] x [N, D] (8 ones rows: the
    kernel wants 16-byte aligned strides, so the ones operand is an [N, 8] buffer read transposed)."""
    ones_8N = d_ND.new_ones(d_ND.shape[0], 8).t()
    return _gmm(ones_8N, d_ND, offs)[:, 0]


def _allocator(recycler: Optional["BufferRecycler"]):
    if recycler is None:
        return lambda key, shape, like: like.new_empty(tuple(shape))
    return recycler.empty


def _row_sums(blocks, like_ND: torch.Tensor, use_mkl: Optional[bool] = None) -> torch.Tensor:
    """[e, D] column sums of each block (bias gradients) as one batched [1, n_i] x [n_i, D] GEMM."""
    ones_1N = like_ND.new_ones(1, max(max(b.shape[0] for b in blocks), 1))
    out_eD = like_ND.new_empty(len(blocks), like_ND.shape[1])
    batched_mm([ones_1N[:, :b.shape[0]] for b in blocks], blocks, [out_eD[i:i + 1] for i in range(len(blocks))],
               use_mkl=use_mkl)
    return out_eD


def grouped_mlp(x_ND, counts: Sequence[int], w1_eFD, b1_eF, w2_eDF, b2_eD,
                recycler: Optional[BufferRecycler] = None, activation: str = "gelu_tanh",
                counts_e: Optional[torch.Tensor] = None, grouped_mm: Optional[str] = None,
                cpu_fast_paths: bool = True) -> torch.Tensor:
    """Apply expert i's MLP to its `counts[i]` consecutive rows of x_ND; differentiable; [N, D] in compute_dtype.
    b1_eF / b2_eD may be None: no biases (GroupedMLPExperts(bias=False) passes None for its frozen zero biases).

    counts_e: the same counts as an int64 tensor on x's device, when the caller has it (the router's): the row ->
    expert map and the grouped kernel's offsets are then built on the device, with no host->device copy.
    grouped_mm: 'auto' | 'on' | 'off' (moe/ops/grouped_mm.py), None = moe.experts.GROUPED_MM.
    cpu_fast_paths: False = plain torch.mm loops and no buffer recycling.
    """
    dtype = compute_dtype(x_ND, w1_eFD)
    mode = GROUPED_MM if grouped_mm is None else grouped_mm
    use_mkl = None if cpu_fast_paths else False
    with _no_autocast(x_ND.device.type):
        return _GroupedMLP.apply(x_ND, tuple(int(n) for n in counts), counts_e, w1_eFD, b1_eF, w2_eDF, b2_eD,
                                 recycler if cpu_fast_paths else None, activation, dtype, mode, use_mkl)


def expert_rows_forward_(x_nD: torch.Tensor, w1_FD, b1_F, w2_DF, b2_D, h_nF: torch.Tensor,
                         y_nD: torch.Tensor, activation: str = "gelu_tanh") -> None:
    """y_nD = act(x_nD w1^T + b1) w2^T + b2 for ONE expert's rows, written in place (h_nF is scratch).

    Forward only (inference), computed in h_nF's dtype (the caller's compute dtype: x and the weights are cast to
    it, so fp32 inputs meet bf16 weights without a dtype error). Each expert is its own GEMM call with pieces cut
    from its own rows, so an expert's output depends only on its rows and weights: not on which other experts
    run, in which order, in which call, or where its weights live (the stacked parameter or an offload cache
    slot). That is what makes NVMe-offloaded inference (moe/offload) bitwise equal to the all-resident model,
    which runs this same function (grouped_mlp_inference). The MKL batch call, by contrast, gives last-bit
    differences when the batch's composition changes.
    """
    n = x_nD.shape[0]
    if n == 0:
        return
    dtype = h_nF.dtype
    x_nD, w1_FD, b1_F, w2_DF, b2_D = (t.to(dtype) for t in (x_nD, w1_FD, b1_F, w2_DF, b2_D))
    with _no_autocast(x_nD.device.type):
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
    """grouped_mlp's forward without autograd, one expert at a time (see expert_rows_forward_); [N, D] in
    compute_dtype (an fp32 input with bf16 weights under autocast, CUDA's LayerNorm output, runs in bf16)."""
    offsets = _offsets(counts)
    dtype = compute_dtype(x_ND, w1_eFD)
    x_ND = x_ND.to(dtype).contiguous()
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

    Expert tensor parallelism (etp_size > 1, this rank etp_rank of them; Megatron-LM's ETP): each expert's FFN is
    split F-wise, f = F / etp_size. fc1 is column-parallel: w1_eFD keeps rows [r f, (r+1) f) (swiglu: the gate rows
    and the up rows of that range, stored [gate_r; up_r], so silu(gate) * up pairs the same columns), b1_eF the same
    entries. fc2 is row-parallel: w2_eDF keeps columns [r f, (r+1) f). b2_eD is split D-wise (columns
    [r d, (r+1) d), d = D / etp_size) and added to those columns only, so the sum of the ranks' outputs carries it
    once and no expert parameter is replicated over ETP. forward then returns this rank's PARTIAL output: the caller
    sums it over the ETP group (moe/layer.py). The full weights are drawn and sliced, so the experts equal the
    ETP = 1 ones from the same seed. Each sharded parameter records `etp_dim` (its split dim in the stacked tensor)
    and `etp_gated` (w1/b1 of a gated activation: two halves split alike) for checkpoint resharding.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 init_method: Optional[Callable] = None, output_layer_init_method: Optional[Callable] = None,
                 first_expert: int = 0, num_experts: Optional[int] = None, activation: str = "gelu_tanh",
                 bias: bool = True, grouped_mm: Optional[str] = None, cpu_fast_paths: Optional[bool] = None,
                 etp_size: int = 1, etp_rank: int = 0):
        super().__init__()
        if ffn_hidden_size % etp_size or hidden_size % etp_size:
            raise ValueError(f"--expert-tensor-parallel-size ({etp_size}) must divide the expert FFN width "
                             f"({ffn_hidden_size}) and the hidden size ({hidden_size}); pick a divisor of both")
        if grouped_mm is not None and grouped_mm not in GROUPED_MM_MODES:
            raise ValueError(f"grouped_mm ({grouped_mm!r}) must be one of {GROUPED_MM_MODES}")
        # None = the process defaults (moe.experts.GROUPED_MM read at each forward; CPU_FAST_PATHS)
        self.grouped_mm = grouped_mm
        self.cpu_fast_paths = CPU_FAST_PATHS if cpu_fast_paths is None else cpu_fast_paths
        e, D, F_ = num_local_experts, hidden_size, ffn_hidden_size
        F1 = 2 * F_ if activation in GATED else F_  # swiglu: w1 holds [gate; up], the grouped GEMM stays one
        total = num_experts if num_experts is not None else e
        if not 0 <= first_expert <= total - e:
            raise ValueError(f"local experts {first_expert}..{first_expert + e - 1} are outside 0..{total - 1}")
        self.num_local_experts, self.activation, self.bias = e, activation, bias
        self.etp_size, self.etp_rank, self.hidden_size = etp_size, etp_rank, D
        f, d = F_ // etp_size, D // etp_size
        self.w1_eFD = nn.Parameter(torch.empty(e, F1 // etp_size, D))
        self.b1_eF = nn.Parameter(torch.zeros(e, F1 // etp_size))
        self.w2_eDF = nn.Parameter(torch.empty(e, D, f))
        self.b2_eD = nn.Parameter(torch.zeros(e, d))
        gated = activation in GATED
        with torch.no_grad():
            w1, w2 = torch.empty(F1, D), torch.empty(D, F_)
            for g in range(total):
                (init_method or _default_init)(w1)
                (output_layer_init_method or init_method or _default_init)(w2)
                if first_expert <= g < first_expert + e:
                    self.w1_eFD[g - first_expert].copy_(etp_shard(w1, 0, etp_size, etp_rank, gated))
                    self.w2_eDF[g - first_expert].copy_(etp_shard(w2, 1, etp_size, etp_rank))
        for p in self.parameters():
            _tag_stacked(p, e)
        if etp_size > 1:
            for p, dim, two in ((self.w1_eFD, 1, gated), (self.b1_eF, 1, gated), (self.w2_eDF, 2, False),
                                (self.b2_eD, 1, False)):
                p.etp_dim, p.etp_gated = dim, two
        if not bias:  # --disable-bias-linear: the biases stay zero (frozen), so the stacked layout is kept
            self.b1_eF.requires_grad_(False)
            self.b2_eD.requires_grad_(False)
        # (not `buffers`: that would shadow nn.Module.buffers())
        self.recycler = BufferRecycler(enabled=self.cpu_fast_paths)

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int], counts_e: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """x_ND [N, D] grouped by expert, counts[i] rows for expert i (host ints), counts_e the same as a device
        tensor when the caller has it (see grouped_mlp) -> [N, D] in compute_dtype."""
        if not (torch.is_grad_enabled() and (x_ND.requires_grad or self.w1_eFD.requires_grad)):
            # inference (no_grad / inference_mode / frozen): the per-expert path that offload matches bitwise
            return grouped_mlp_inference(x_ND, counts, self.w1_eFD, self.b1_eF, self.w2_eDF, self.b2_full(),
                                         self.activation)
        # without biases (frozen at zero) the training path skips them: no [N, F] bias rows to write and read
        b1, b2 = (self.b1_eF, self.b2_full()) if self.bias else (None, None)
        return grouped_mlp(x_ND, counts, self.w1_eFD, b1, self.w2_eDF, b2, self.recycler,
                           self.activation, counts_e=counts_e, grouped_mm=self.grouped_mm,
                           cpu_fast_paths=self.cpu_fast_paths)


    def b2_full(self) -> torch.Tensor:
        """[e, D] fc2 bias as added by this rank: its D-slice in place, zeros elsewhere (ETP = 1: b2_eD itself)."""
        if self.etp_size == 1:
            return self.b2_eD
        d = self.b2_eD.shape[1]
        return F.pad(self.b2_eD, (self.etp_rank * d, self.hidden_size - (self.etp_rank + 1) * d))


def etp_shard(t: torch.Tensor, dim: int, etp_size: int, etp_rank: int, gated: bool = False) -> torch.Tensor:
    """Rank etp_rank's piece of a whole expert tensor along `dim`; `gated` (swiglu fc1 [gate; up]): the same
    piece of each half, concatenated [gate_r; up_r]. The inverse is etp_merge."""
    if etp_size == 1:
        return t
    if gated:
        return torch.cat([h.chunk(etp_size, dim)[etp_rank] for h in t.chunk(2, dim)], dim)
    return t.chunk(etp_size, dim)[etp_rank]


def etp_merge(pieces: Sequence[torch.Tensor], dim: int, gated: bool = False) -> torch.Tensor:
    """The whole tensor from every ETP rank's piece, in rank order (inverse of etp_shard)."""
    if len(pieces) == 1:
        return pieces[0]
    if gated:
        halves = [p.chunk(2, dim) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(list(pieces), dim)


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
            tag_module_expert(module, i, num_local_experts)

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int], counts_e: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        chunks = torch.split(x_ND, [int(n) for n in counts], dim=0)
        outs = []
        for module, chunk in zip(self.experts, chunks):
            if chunk.shape[0] == 0:
                outs.append(chunk)
                continue
            out = module(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)  # DeepSpeed accepts (out, bias) experts
        return torch.cat(outs, dim=0)
