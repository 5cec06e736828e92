"""Dense GELU MLP, the replaceable per-layer submodule (the MoE layer takes its place on MoE layers)."""
import torch
import torch.nn.functional as F

from megatron.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class ParallelMLP(torch.nn.Module):
    """h -> ffn -> h with GELU (tanh approximation, as Megatron's bias_gelu fusion).

    With tensor parallelism the first projection is column-parallel (each rank holds ffn/tp features) and the
    second row-parallel (partial sums all-reduced), so the GELU runs on the local slice with no communication.
    forward(x [b, s, h]) -> (y [b, s, h], None); the None slot is where an MoE layer returns its stats.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_method, output_layer_init_method,
                 tp_group=None):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(hidden_size, ffn_hidden_size, tp_group, init_method,
                                                  what="--ffn-hidden-size")
        self.dense_4h_to_h = RowParallelLinear(ffn_hidden_size, hidden_size, tp_group, output_layer_init_method,
                                               what="--ffn-hidden-size")

    def forward(self, x: torch.Tensor):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh")), None
