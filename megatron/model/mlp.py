"""Dense MLP, the replaceable per-layer submodule (the MoE layer takes its place on MoE layers)."""
import torch

from megatron.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from moe.experts import GATED, MLP


class ParallelMLP(MLP):
    """h -> ffn -> h, moe.experts.MLP (the one MLP the experts also compute) with tensor-parallel linears.

    `activation`: 'gelu_tanh' (default: Megatron's fused bias-GeLU is the tanh approximation), 'gelu' (exact,
    Megatron with --no-bias-gelu-fusion) or 'swiglu' (--swiglu: the first projection holds [gate; up], 2 x ffn
    rows). With tensor parallelism the first projection is column-parallel (each rank holds ffn/tp features; for
    swiglu stride 2, so each rank holds [gate_r; up_r], the matching halves) and the second row-parallel (partial
    sums all-reduced), so the activation runs on the local slice with no communication. sequence_parallel: x is
    this rank's [b, s/tp, h] chunk, all-gathered by the first projection; the second reduce-scatters it back.
    forward(x [b, s, h]) -> (y [b, s, h], None); the None slot is where an MoE layer returns its stats.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_method, output_layer_init_method,
                 tp_group=None, activation: str = "gelu_tanh", bias: bool = True, sequence_parallel: bool = False):
        gated = activation in GATED
        super().__init__(hidden_size, ffn_hidden_size, activation,
                         dense_h_to_4h=ColumnParallelLinear(hidden_size, (2 if gated else 1) * ffn_hidden_size,
                                                            tp_group, init_method, bias=bias, stride=2 if gated else 1,
                                                            what="--ffn-hidden-size",
                                                            sequence_parallel=sequence_parallel),
                         dense_4h_to_h=RowParallelLinear(ffn_hidden_size, hidden_size, tp_group,
                                                         output_layer_init_method, bias=bias, what="--ffn-hidden-size",
                                                         sequence_parallel=sequence_parallel))

    def forward(self, x: torch.Tensor):
        return super().forward(x), None
