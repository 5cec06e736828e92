"""The Mixtral-, Qwen3-MoE- and DeepSeek-V3-style example scripts (issue 25): their flag lines parse into valid
configs with the intended architecture, and the model they describe runs forward and backward. The scripts are run
with PYTHON=echo, so bash prints the launcher command instead of training (the training itself is the scripts'
own job: a few iterations each, see docs/design.md)."""
import os
import subprocess

import pytest
import torch

from megatron.arguments import parse_args, train_config_from_args, validate
from megatron.model import GPTModel
from tests.conftest import ROOT

SCRIPTS = {
    "pretrain_mixtral.sh": dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2,
                                untie_embeddings_and_output_weights=True, position_embedding_type="rope"),
    "pretrain_qwen3_moe.sh": dict(qk_layernorm=True, kv_channels=32, num_query_groups=2, activation="swiglu"),
    "pretrain_deepseek_v3.sh": dict(multi_latent_attention=True, q_lora_rank=48, layernorm_epsilon=1e-6),
}


def _flags(script: str) -> list:
    env = {**os.environ, "PYTHON": "echo"}
    out = subprocess.run(["bash", os.path.join("examples_moe", script)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[out.index("pretrain_gpt.py") + 1:]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_builds_its_model(script):
    args = parse_args(_flags(script))
    cfg = train_config_from_args(args, padded_vocab_size=256, dp_size=1)  # a small vocabulary: only the blocks matter
    validate(cfg, world_size=1)
    for field, want in SCRIPTS[script].items():
        assert getattr(cfg.model, field) == want, field
    assert not cfg.model.add_bias_linear and cfg.moe is not None and not cfg.moe.drop_tokens
    assert cfg.moe.router_family == "megatron"  # Megatron-LM's --moe-router-* flags, as the original scripts
    if script == "pretrain_deepseek_v3.sh":
        assert (cfg.moe.score_function, cfg.moe.expert_bias, cfg.moe.num_groups, cfg.moe.group_topk,
                cfg.moe.topk_scaling_factor, cfg.moe.load_balancing_type) == ("sigmoid", True, 4, 2, 2.5,
                                                                              "seq_aux_loss")
    plan = cfg.moe.layer_plan(cfg.model.num_layers)
    if script == "pretrain_deepseek_v3.sh":
        assert plan[0] is None and all(plan[1:]) and cfg.moe.shared_expert_ffn_hidden_size == 32
    else:
        assert all(plan)  # Megatron-LM's placement: every layer
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.moe)
    tokens = torch.randint(0, 256, (1, 16))
    out = model(tokens, tokens)
    (out.loss.mean() + sum(s.aux_loss for s in out.moe_stats)).backward()
    assert torch.isfinite(out.loss).all()
