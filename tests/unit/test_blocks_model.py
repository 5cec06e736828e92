"""GPTModel built from Megatron-LM core block flags (issue 25): Mixtral- and DeepSeek-V3-style models run forward
and backward, decode incrementally exactly as in one pass, checkpoints refuse an architecture mismatch, and every
impossible combination is one ConfigError naming the flag."""
import dataclasses

import pytest
import torch

from megatron.arguments import parse_args, train_config_from_args, validate
from megatron.config import ModelConfig
from megatron.errors import CheckpointError, ConfigError
from megatron.model import GPTModel
from moe.config import MoEConfig

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--train-iters", "10"]
V = 128


def _model_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=16,
                max_position_embeddings=16, padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0,
                position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                untie_embeddings_and_output_weights=True)
    return ModelConfig(**{**base, **kw})


MIXTRAL = (dict(num_query_groups=2), dict(num_experts=4, topk=2, drop_tokens=False, layer_freq=1,
                                         second_expert_sampling=False))  # no Gumbel noise: decoding compares
QWEN3 = (dict(num_query_groups=2, kv_channels=16, qk_layernorm=True),
         dict(num_experts=8, topk=4, drop_tokens=False, layer_freq=1, moe_ffn_hidden_size=16))
DEEPSEEK = (dict(multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
                 v_head_dim=8, qk_layernorm=True),
            dict(num_experts=8, topk=2, drop_tokens=False, layer_freq=(0, 1), moe_ffn_hidden_size=16,
                 second_expert_sampling=False,
                 shared_expert_ffn_hidden_size=16))


@pytest.mark.parametrize("model_kw,moe_kw", [MIXTRAL, QWEN3, DEEPSEEK], ids=["mixtral", "qwen3-moe", "deepseek-v3"])
def test_modern_models_train_and_decode(model_kw, moe_kw):
    torch.manual_seed(0)
    cfg, moe_cfg = _model_cfg(**model_kw), MoEConfig(**moe_kw)
    model = GPTModel(cfg, moe_cfg)
    names = dict(model.named_parameters())
    assert not [n for n, p in names.items() if n.endswith(".bias") and p.requires_grad]  # --disable-bias-linear
    assert "output_layer.weight" in names and "position_embeddings.weight" not in names
    n_moe = sum(s is not None for s in moe_cfg.layer_plan(cfg.num_layers))
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(tokens, tokens)
    assert len(out.moe_stats) == n_moe
    (out.loss.mean() + sum(s.aux_loss for s in out.moe_stats)).backward()
    assert all(p.grad is not None for n, p in names.items() if p.requires_grad)
    model.eval()
    with torch.no_grad():  # incremental decoding with a KV cache equals one pass (GQA / MLA caches)
        full = model(tokens).logits
        cache = model.new_kv_cache()
        steps = [model(tokens[:, :6], kv_cache=cache).logits] + [
            model(tokens[:, i:i + 1], kv_cache=cache).logits for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)  # fp32 round-off


def test_rotary_percent_rotates_the_leading_dims_only():
    from megatron.model.rope import RotaryEmbedding, apply_rotary

    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    cos, sin = RotaryEmbedding(8)(torch.arange(5).unsqueeze(0).expand(2, 5))
    y = apply_rotary(x, cos.double(), sin.double())
    torch.testing.assert_close(y[..., 8:], x[..., 8:], rtol=0, atol=0)
    torch.testing.assert_close(y[..., :8], apply_rotary(x[..., :8].contiguous(), cos.double(), sin.double()))
    assert _model_cfg(rotary_percent=0.5).rotary_dim == 4  # head dim 8 x 0.5


def test_no_position_embedding_and_layernorm_kinds():
    m = GPTModel(_model_cfg(position_embedding_type="none", normalization="LayerNorm", activation="gelu",
                            add_bias_linear=True, untie_embeddings_and_output_weights=False))
    assert m.rotary is None and m.position_embeddings is None and m.output_layer is None
    assert isinstance(m.final_layernorm, torch.nn.LayerNorm)
    assert m.output_weight is m.word_embeddings.weight


def test_checkpoint_refuses_another_block_architecture():
    from megatron.checkpointing import check_config_match

    saved = dataclasses.asdict(_model_cfg(num_query_groups=2))
    check_config_match(saved, dict(saved), "training", "ck")
    with pytest.raises(CheckpointError, match=r"--num-query-groups mismatch: checkpoint ck has num_query_groups=2"):
        check_config_match(saved, dataclasses.asdict(_model_cfg(num_query_groups=4)), "training", "ck")
    with pytest.raises(CheckpointError, match=r"--normalization mismatch"):
        check_config_match(saved, dataclasses.asdict(_model_cfg(num_query_groups=2, normalization="LayerNorm")),
                           "training", "ck")
    moe = dataclasses.asdict(MoEConfig(num_experts=4, layer_freq=1, shared_expert_ffn_hidden_size=8))
    with pytest.raises(CheckpointError, match=r"--moe-layer-freq mismatch"):
        check_config_match(moe, dataclasses.asdict(MoEConfig(num_experts=4, shared_expert_ffn_hidden_size=8)),
                           "training", "ck")


@pytest.mark.parametrize("extra,match", [
    (["--group-query-attention", "--num-query-groups", "3"], r"--num-query-groups \(3\) must divide "
                                                              r"--num-attention-heads \(4\)"),
    (["--num-query-groups", "2"], r"--num-query-groups 2 needs --group-query-attention"),
    (["--swiglu", "--openai-gelu"], r"--swiglu replaces the GELU"),
    (["--rotary-percent", "1.5"], r"--rotary-percent \(1.5\) must be in \(0, 1\]"),
    (["--position-embedding-type", "rope", "--rotary-percent", "0.1"], r"rope needs an even head dim"),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--group-query-attention"],
     r"--multi-latent-attention and --group-query-attention"),
    (["--multi-latent-attention"], r"--multi-latent-attention needs --position-embedding-type rope"),
    (["--normalization", "rmsnorm"], None),  # argparse's own choice error (SystemExit 2)
    (["--num-experts", "4", "--moe-layer-freq", "[1,0]"], r"--moe-layer-freq lists 2 layers but --num-layers is 4"),
    (["--num-experts", "4", "--moe-layer-freq", "open('x')"], r"--moe-layer-freq \(.*open.*\) must be an int"),
    (["--num-experts", "4", "--moe-shared-expert-gate"], r"--moe-shared-expert-gate gates the shared expert"),
    (["--rotary-scaling-factor", "40"], r"RoPE scaling \(YaRN\) is not implemented"),
])
def test_block_flag_errors_are_one_line(extra, match):
    if match is None:
        with pytest.raises(SystemExit):
            parse_args(BASE + extra)
        return
    with pytest.raises(ConfigError, match=match) as e:
        train_config_from_args(parse_args(BASE + extra), V, 1)
    assert "\n" not in str(e.value)


def test_query_groups_must_divide_tensor_parallel_size():
    args = parse_args(BASE + ["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size",
                              "2", "--global-batch-size", "2"])
    with pytest.raises(ConfigError, match=r"--num-query-groups \(1\) must be divisible by "
                                          r"--tensor-model-parallel-size \(2\)"):
        validate(train_config_from_args(args, V, 1), world_size=2)


def test_expert_model_parallel_size_is_the_ep_flag():
    a = train_config_from_args(parse_args(BASE + ["--num-experts", "4", "--expert-model-parallel-size", "2"]), V, 2)
    b = train_config_from_args(parse_args(BASE + ["--num-experts", "4", "--moe-expert-parallel-size", "2"]), V, 2)
    assert a.moe == b.moe and a.moe.ep_size == (2,)
