"""GPT model: causality, shapes, Megatron init statistics, KV-cache equivalence, RoPE."""
import math

import pytest
import torch

from megatron.config import ModelConfig
from megatron.model import GPTModel


def tiny_cfg(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16,
                max_position_embeddings=16, padded_vocab_size=128, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_causality_changing_future_token_never_changes_past_logits(pos):
    torch.manual_seed(0)
    m = GPTModel(tiny_cfg(position_embedding_type=pos)).eval()
    t = torch.randint(0, 128, (2, 16))
    base = m(t).logits
    for pos_changed in (1, 7, 15):
        t2 = t.clone()
        t2[:, pos_changed] = (t2[:, pos_changed] + 1) % 128
        out = m(t2).logits
        # positions before the change are bit-identical: nothing flows backwards in time
        assert torch.equal(out[:, :pos_changed], base[:, :pos_changed])
        assert not torch.allclose(out[:, pos_changed:], base[:, pos_changed:])


def test_shapes_and_loss_matches_manual_cross_entropy():
    torch.manual_seed(0)
    m = GPTModel(tiny_cfg()).eval()
    t = torch.randint(0, 128, (3, 16))
    labels = torch.randint(0, 128, (3, 16))
    out = m(t, labels, return_logits=True)
    assert out.logits.shape == (3, 16, 128) and out.loss.shape == (3, 16) and out.moe_stats == []
    ref = -torch.log_softmax(out.logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 vs fp64 softmax


def test_megatron_init_statistics():
    torch.manual_seed(0)
    cfg = tiny_cfg(num_layers=8, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                   padded_vocab_size=1024, init_method_std=0.02)
    m = GPTModel(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)
    for layer in m.layers:
        # ~65k-260k samples each: the sample std is within 2% of the target with overwhelming probability
        assert abs(layer.self_attention.query_key_value.weight.std().item() - 0.02) < 0.02 * 0.02
        assert abs(layer.self_attention.dense.weight.std().item() - out_std) < out_std * 0.02
        assert abs(layer.mlp.dense_h_to_4h.weight.std().item() - 0.02) < 0.02 * 0.02
        assert abs(layer.mlp.dense_4h_to_h.weight.std().item() - out_std) < out_std * 0.02
        assert torch.count_nonzero(layer.self_attention.query_key_value.bias) == 0
        assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    assert abs(m.word_embeddings.weight.std().item() - 0.02) < 0.02 * 0.02


def test_tied_embeddings():
    m = GPTModel(tiny_cfg())
    names = [n for n, _ in m.named_parameters()]
    assert not any("lm_head" in n or "output_layer" in n for n in names)
    t = torch.randint(0, 128, (1, 8))
    m(t, t).loss.sum().backward()
    assert m.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_kv_cache_incremental_equals_full_forward(pos):
    torch.manual_seed(1)
    m = GPTModel(tiny_cfg(position_embedding_type=pos)).eval()
    t = torch.randint(0, 128, (2, 16))
    full = m(t).logits
    cache = m.new_kv_cache()
    parts = [m(t[:, :9], kv_cache=cache).logits, m(t[:, 9:10], kv_cache=cache).logits,
             m(t[:, 10:], kv_cache=cache).logits]  # prefill, one token, then a chunk after a cached prefix
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)  # different GEMM shapes


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = GPTModel(tiny_cfg(hidden_dropout=0.5, attention_dropout=0.5))
    t = torch.randint(0, 128, (2, 16))
    m.eval()
    assert torch.equal(m(t).logits, m(t).logits)
    m.train()
    assert not torch.equal(m(t).logits, m(t).logits)


def test_bad_config_names_flag():
    with pytest.raises(ValueError, match="--hidden-size .*divisible by --num-attention-heads"):
        tiny_cfg(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="--max-position-embeddings"):
        tiny_cfg(max_position_embeddings=8)
