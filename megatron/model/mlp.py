"""Dense GELU MLP, the replaceable per-layer submodule (the MoE layer takes its place on MoE layers)."""
import torch
import torch.nn.functional as F


class ParallelMLP(torch.nn.Module):
    """h -> ffn -> h with GELU (tanh approximation, as Megatron's bias_gelu fusion).

    forward(x [b, s, h]) -> (y [b, s, h], None); the None slot is where an MoE layer returns its stats.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_method, output_layer_init_method):
        super().__init__()
        self.dense_h_to_4h = torch.nn.Linear(hidden_size, ffn_hidden_size)
        self.dense_4h_to_h = torch.nn.Linear(ffn_hidden_size, hidden_size)
        init_method(self.dense_h_to_4h.weight)
        output_layer_init_method(self.dense_4h_to_h.weight)
        torch.nn.init.zeros_(self.dense_h_to_4h.bias)
        torch.nn.init.zeros_(self.dense_4h_to_h.bias)

    def forward(self, x: torch.Tensor):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh")), None
