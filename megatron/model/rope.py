"""Rotary position embedding (RoPE) tables and their application to query/key heads."""
import torch


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0, f"RoPE needs an even head dim (got {head_dim}); ModelConfig checks the flags"
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def init_buffers(self) -> None:
        """Recomputes the non-persistent table (after a model built on the meta device is materialised)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor):
        """position_ids [b, s] -> (cos, sin) each [b, 1, s, head_dim] in fp32."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]; rotation computed in fp32 then cast back. When the tables cover r < d dims
    (--rotary-percent, as Megatron-LM and GPT-NeoX), the first r dims are rotated and the rest pass through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
