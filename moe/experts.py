"""The experts of one rank: stacked GELU MLPs computed by one grouped-GEMM autograd Function, or copies
of a user expert module; plus the expert-parallel parameter tags.

Shape legend: N rows (tokens grouped by local expert, expert i owns rows [off_i, off_i + n_i)),
D hidden, F ffn hidden, e local experts.
"""
from __future__ import annotations

import copy
import math
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


def _offsets(counts: Sequence[int]) -> List[int]:
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    return offsets


class _GroupedMLP(torch.autograd.Function):
    """y_i = gelu(x_i W1_i^T + b1_i) W2_i^T + b2_i for every local expert i, forward and backward.

    One Function instead of per-expert autograd ops: each GEMM writes straight into a slice of one
    output buffer (no per-expert graph nodes, no W[i] indexing inside autograd, which would make
    backward materialise a full-size [e, ...] gradient per expert), experts with no rows are skipped
    (empty capacity costs nothing), and backward handles one expert at a time (dW2, dA, GELU', dW1, dX)
    so that expert's weights and activations stay in cache across its four GEMMs.
    """

    @staticmethod
    def forward(ctx, x_ND, counts, w1_eFD, b1_eF, w2_eDF, b2_eD):
        offsets = _offsets(counts)
        h_NF = x_ND.new_empty(x_ND.shape[0], w1_eFD.shape[1])
        y_ND = x_ND.new_empty(x_ND.shape[0], w2_eDF.shape[1])
        for i, n in enumerate(counts):
            if n:
                s = slice(offsets[i], offsets[i + 1])
                torch.addmm(b1_eF[i], x_ND[s], w1_eFD[i].t(), out=h_NF[s])
        a_NF = F.gelu(h_NF)
        for i, n in enumerate(counts):
            if n:
                s = slice(offsets[i], offsets[i + 1])
                torch.addmm(b2_eD[i], a_NF[s], w2_eDF[i].t(), out=y_ND[s])
        ctx.counts, ctx.offsets = counts, offsets
        ctx.save_for_backward(x_ND, h_NF, a_NF, w1_eFD, w2_eDF)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, h_NF, a_NF, w1_eFD, w2_eDF = ctx.saved_tensors
        counts, offsets = ctx.counts, ctx.offsets
        dy_ND = dy_ND.contiguous()
        need_dx, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dx_ND = torch.empty_like(x_ND) if need_dx else None
        dw1 = torch.empty_like(w1_eFD) if need_w1 else None
        dw2 = torch.empty_like(w2_eDF) if need_w2 else None
        db1 = dy_ND.new_empty(w1_eFD.shape[:2]) if need_b1 else None
        db2 = dy_ND.new_empty(w2_eDF.shape[:2]) if need_b2 else None
        for i, n in enumerate(counts):
            if n == 0:
                for g in (dw1, dw2, db1, db2):
                    if g is not None:
                        g[i].zero_()
                continue
            s = slice(offsets[i], offsets[i + 1])
            dy, a = dy_ND[s], a_NF[s]
            if dw2 is not None:
                torch.mm(dy.t(), a, out=dw2[i])
            if db2 is not None:
                torch.sum(dy, dim=0, out=db2[i])
            dh = torch.ops.aten.gelu_backward(torch.mm(dy, w2_eDF[i]), h_NF[s])
            if dw1 is not None:
                torch.mm(dh.t(), x_ND[s], out=dw1[i])
            if db1 is not None:
                torch.sum(dh, dim=0, out=db1[i])
            if dx_ND is not None:
                torch.mm(dh, w1_eFD[i], out=dx_ND[s])
        return dx_ND, None, dw1, db1, dw2, db2


def grouped_mlp(x_ND, counts: Sequence[int], w1_eFD, b1_eF, w2_eDF, b2_eD) -> torch.Tensor:
    """Apply expert i's GELU MLP to its `counts[i]` consecutive rows of x_ND; differentiable."""
    return _GroupedMLP.apply(x_ND, tuple(int(n) for n in counts), w1_eFD, b1_eF, w2_eDF, b2_eD)


def _default_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default


class GroupedMLPExperts(nn.Module):
    """e GELU MLP experts (D -> F -> D, with biases) held as stacked weights, dim 0 = local expert.

    Weights use nn.Linear's [out, in] layout per expert (w1_eFD[i] is expert i's fc1 weight), so
    `init_method` / `output_layer_init_method` (fill a tensor in place) are applied to each expert's
    slice and every expert has exactly that distribution. Biases start at zero (Megatron). No
    communication.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 init_method: Optional[Callable] = None, output_layer_init_method: Optional[Callable] = None):
        super().__init__()
        e, D, F_ = num_local_experts, hidden_size, ffn_hidden_size
        self.num_local_experts = e
        self.w1_eFD = nn.Parameter(torch.empty(e, F_, D))
        self.b1_eF = nn.Parameter(torch.zeros(e, F_))
        self.w2_eDF = nn.Parameter(torch.empty(e, D, F_))
        self.b2_eD = nn.Parameter(torch.zeros(e, D))
        with torch.no_grad():
            for i in range(e):
                (init_method or _default_init)(self.w1_eFD[i])
                (output_layer_init_method or init_method or _default_init)(self.w2_eDF[i])
        for p in self.parameters():
            _tag_stacked(p, e)

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return grouped_mlp(x_ND, counts, self.w1_eFD, self.b1_eF, self.w2_eDF, self.b2_eD)


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
