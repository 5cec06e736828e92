"""`OffloadedExperts`: a MoE layer's experts computed from weights the cache hands out (the layer knows no files).

Shape legend: N rows (tokens grouped by local expert), D hidden, F ffn hidden, e experts of the layer.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from moe.experts import _autocast_on, _offsets, expert_rows_forward_


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype != torch.float64 and _autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class OffloadedExperts(nn.Module):
    """Stands in for GroupedMLPExperts at inference: same forward(x_ND, counts) -> y_ND, no parameters.

    Args:
        source: an ExpertCache (anything with `stream(layer, experts)` yielding (expert, {"w1_FD", "b1_F",
            "w2_DF", "b2_D"})).
        layer_index: this MoE layer's index among MoE layers (the store's record key).
        num_experts, hidden_size, ffn_hidden_size: e, D, F.
        activation: the experts' activation (the replaced GroupedMLPExperts' `activation`).
    Each expert's rows are computed by moe.experts.expert_rows_forward_, the function the resident model's
    inference path runs, so the output is bitwise that of the all-in-memory layer whatever the cache did.
    forward_many runs several micro-batches' rows through the layer with each expert fetched once
    (layer-major scoring).
    """

    def __init__(self, source, layer_index: int, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "gelu_tanh"):
        super().__init__()
        self.activation = activation
        self.source, self.layer_index = source, layer_index
        self.num_local_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return self.forward_many([(x_ND, counts)])[0]

    def forward_many(self, jobs: List[Tuple[torch.Tensor, Sequence[int]]]) -> List[torch.Tensor]:
        if torch.is_grad_enabled() and any(x.requires_grad for x, _ in jobs):
            raise RuntimeError("offloaded experts are for inference: run under torch.no_grad()")
        prepared = []
        for x_ND, counts in jobs:
            counts = [int(c) for c in counts]
            # the compute dtype the resident layer would use (moe.experts.compute_dtype with weights in the model's
            # dtype, which is x's): the store's records keep their own dtype (bf16, fp16, fp32) and are cast to it
            x_ND = x_ND.to(_compute_dtype(x_ND)).contiguous()
            prepared.append((x_ND, _offsets(counts), x_ND.new_empty(x_ND.shape[0], self.ffn_hidden_size),
                             x_ND.new_empty(x_ND.shape[0], self.hidden_size)))
        needed = sorted({i for _, counts in jobs for i, c in enumerate(counts) if int(c) > 0})
        for expert, w in self.source.stream(self.layer_index, needed):
            for x_ND, off, h_NF, y_ND in prepared:
                r = slice(off[expert], off[expert + 1])
                if r.stop > r.start:
                    expert_rows_forward_(x_ND[r], w["w1_FD"], w["b1_F"], w["w2_DF"], w["b2_D"], h_NF[r], y_ND[r],
                                         self.activation)
        return [y_ND for _, _, _, y_ND in prepared]

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, experts={self.num_local_experts}, offloaded"
