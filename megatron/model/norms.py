"""The normalisation layers a block can use (--normalization LayerNorm|RMSNorm) and the one factory that picks."""
import torch


class RMSNorm(torch.nn.Module):
    """y = w · x / sqrt(mean(x²) + eps) over the last dim (Zhang & Sennrich 2019), computed in fp32 and cast back
    before the weight, as transformers' LlamaRMSNorm and Megatron-LM's (TE) RMSNorm; weight starts at 1."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def build_norm(kind: str, size: int, eps: float) -> torch.nn.Module:
    """'LayerNorm' (with bias, Megatron's default) or 'RMSNorm' over `size` features; ModelConfig checks `kind`."""
    if kind == "RMSNorm":
        return RMSNorm(size, eps)
    return torch.nn.LayerNorm(size, eps=eps)
