"""megatron.inference.generate never draws a padded row of the output layer (ids >= the tokenizer's vocabulary:
--make-vocab-size-divisible-by x TP pads it; a SentencePiece decode of such an id fails: 'piece id is out of
range', found running tools/generate.py on a TP=2 checkpoint)."""
from types import SimpleNamespace

import torch

from megatron.inference import generate


class _Scripted(torch.nn.Module):
    """A stand-in model: 64 output rows, the largest logit on padded row 60, then on token 7."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(max_position_embeddings=32)
        self.position_embeddings = None

    def new_kv_cache(self):
        return None

    def forward(self, x, kv_cache=None):
        logits = torch.zeros(x.shape[0], x.shape[1], 64)
        logits[..., 60] = 9.0
        logits[..., 7] = 5.0
        return SimpleNamespace(logits=logits)


def test_padded_rows_are_never_drawn():
    model = _Scripted()
    assert generate(model, [1, 2], 3, temperature=0.0) == [60, 60, 60]  # the reference: padding wins unmasked
    assert generate(model, [1, 2], 3, temperature=0.0, vocab_size=50) == [7, 7, 7]
    drawn = generate(model, [1, 2], 20, temperature=5.0, vocab_size=50, seed=1)
    assert max(drawn) < 50, drawn
