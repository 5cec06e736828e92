"""PR-MoE: pyramid expert counts and per-layer EP sizes from the CLI, Residual-MoE mixing, checkpoint mismatches."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.arguments import parse_args, train_config_from_args, validate
from megatron.errors import ConfigError
from megatron.checkpointing import CheckpointError
from megatron.flops import flops_per_token
from megatron.model import GPTModel
from megatron.optimizer import clip_grad_norm
from megatron.training import pretrain
from moe import MoE, MoEConfig, MoELayer
from moe.experts import is_expert_param
from tests.conftest import tiny_train_argv

BASE = ["--num-layers", "6", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--train-iters", "1", "--expert-interval", "2"]


def _cfg(*extra):
    return train_config_from_args(parse_args(BASE + list(extra)), padded_vocab_size=128, dp_size=1)


# ---------------------------------------------------------------------------------------------- pyramid / EP flags
def test_pyramid_layers_get_their_expert_counts():
    cfg = _cfg("--num-experts", "2", "4", "8")
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.moe, None)
    mlps = [layer.mlp for layer in model.layers]
    assert [type(m).__name__ for m in mlps] == ["ParallelMLP", "MoELayer"] * 3  # layers 1, 3, 5 are MoE
    assert [m.num_experts for m in mlps[1::2]] == [2, 4, 8]
    assert [m.layer_index for m in mlps[1::2]] == [0, 1, 2]
    assert [m.experts.w1_eFD.shape[0] for m in mlps[1::2]] == [2, 4, 8]
    tokens = torch.randint(0, 128, (2, 16))
    out = model(tokens, tokens)
    assert [tuple(s.tokens_per_expert.shape) for s in out.moe_stats] == [(2,), (4,), (8,)]


def test_per_layer_ep_sizes_parsed_and_validated():
    cfg = _cfg("--num-experts", "2", "4", "8", "--moe-expert-parallel-size", "1", "2", "4", "--global-batch-size", "4")
    assert cfg.moe.ep_size == (1, 2, 4)
    assert [cfg.moe.ep_size_for_layer(i) for i in range(3)] == [1, 2, 4]
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"--moe-expert-parallel-size \(4\) x --expert-tensor-parallel-size \(1\) = 4 must divide the ranks"):
        validate(cfg, world_size=2)
    # without process groups, a layer with EP > 1 cannot be built: the error names the flag and the layer
    with pytest.raises(ValueError, match=r"--moe-expert-parallel-size \(2\) of MoE layer 1"):
        GPTModel(cfg.model, cfg.moe, None)
    assert _cfg("--num-experts", "4", "--moe-expert-parallel-size", "2").moe.ep_size == (2,)


@pytest.mark.parametrize("flag, values", [("--num-experts", ["2", "4"]), ("--moe-expert-parallel-size", ["1", "2"])])
def test_wrong_list_length_names_the_flag(flag, values):
    other = ["--num-experts", "4"] if flag != "--num-experts" else []
    with pytest.raises(ConfigError, match=flag + r" has 2 values; give one, or one per MoE layer \(3"):
        _cfg(*other, flag, *values)


def test_expert_count_not_divisible_by_its_layers_ep_size():
    with pytest.raises(ValueError, match=r"--num-experts \(6\) must be divisible by --moe-expert-parallel-size \(4\) "
                                         r"at MoE layer 2"):
        _cfg("--num-experts", "2", "4", "6", "--moe-expert-parallel-size", "1", "2", "4")
    with pytest.raises(ValueError, match=r"--num-experts \(2\) must be divisible by --moe-expert-parallel-size \(4\) "
                                         r"at MoE layer 0"):
        _cfg("--num-experts", "2", "4", "8", "--moe-expert-parallel-size", "4")


# ---------------------------------------------------------------------------------------------- residual
D, FF, E = 8, 16, 4


def _layer(mlp_type, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, topk=2, drop_tokens=False, mlp_type=mlp_type, second_expert_sampling=False, **kw)
    return MoELayer(D, FF, E, cfg).double()


def _dense_branch(layer, x_TD):
    """The residual MLP and coefficients recomputed from the raw parameters (tanh GELU, as the experts)."""
    mlp, lin = layer.residual.mlp, layer.residual.coefficient
    mlp_TD = F.linear(F.gelu(F.linear(x_TD, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias), approximate="tanh"),
                      mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)
    return mlp_TD, torch.softmax(x_TD @ lin.weight.t() + lin.bias, dim=-1)


def test_residual_coefficients_are_a_per_token_softmax():
    layer = _layer("residual")
    x_TD = torch.randn(20, D, dtype=torch.float64) * 3
    coef_T2 = layer.residual.coefficients(x_TD)
    assert coef_T2.shape == (20, 2)
    assert bool((coef_T2 > 0).all() and (coef_T2 < 1).all())
    torch.testing.assert_close(coef_T2.sum(-1), torch.ones(20, dtype=torch.float64), rtol=0, atol=1e-12)
    assert coef_T2[:, 0].std() > 0  # per token, not one global weight


def test_residual_mixes_moe_and_dense_outputs():
    standard, residual = _layer("standard"), _layer("residual")  # same seed: same router and experts
    assert standard.residual is None
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y_moe, _ = standard(x)
    y, stats = residual(x)
    mlp_TD, coef_T2 = _dense_branch(residual, x.reshape(-1, D))
    want = y_moe.reshape(-1, D) * coef_T2[:, 0:1] + mlp_TD * coef_T2[:, 1:2]
    torch.testing.assert_close(y.reshape(-1, D), want, rtol=1e-12, atol=1e-12)  # fp64, same ops
    assert y.shape == x.shape and stats.tokens_per_expert.sum() == 2 * 10  # dropless top-2


def test_residual_with_moe_branch_zeroed_is_dense_times_its_coefficient():
    layer = _layer("residual")
    with torch.no_grad():
        layer.experts.w2_eDF.zero_()
        layer.experts.b2_eD.zero_()
    x = torch.randn(3, 4, D, dtype=torch.float64)
    y, _ = layer(x)
    mlp_TD, coef_T2 = _dense_branch(layer, x.reshape(-1, D))
    torch.testing.assert_close(y.reshape(-1, D), mlp_TD * coef_T2[:, 1:2], rtol=1e-12, atol=1e-12)


def test_residual_gradients_reach_both_branches_and_the_coefficient():
    layer = _layer("residual")
    x = torch.randn(2, 6, D, dtype=torch.float64, requires_grad=True)
    y, stats = layer(x)
    (y.pow(2).sum() + stats.aux_loss).backward()
    named = dict(layer.named_parameters())
    for name in ("residual.mlp.dense_h_to_4h.weight", "residual.mlp.dense_4h_to_h.weight", "residual.coefficient.weight",
                 "residual.coefficient.bias", "experts.w1_eFD", "experts.w2_eDF", "router.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    # the dense branch and the coefficient are dense (replicated, DP-reduced) parameters, not expert ones
    assert not any(is_expert_param(p) for n, p in named.items() if n.startswith("residual."))
    assert all(is_expert_param(p) for n, p in named.items() if n.startswith("experts."))


def test_deepspeed_wrapper_use_residual():
    torch.manual_seed(0)
    layer = MoE(D, num_experts=E, k=1, use_residual=True, ffn_hidden_size=FF)
    out, l_aux, counts = layer(torch.randn(2, 3, D))
    assert out.shape == (2, 3, D) and l_aux.dim() == 0 and counts.shape == (E,)
    assert layer.moe.residual is not None
    expert = nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))
    layer = MoE(D, expert=expert, num_experts=E, use_residual=True)
    assert isinstance(layer.moe.residual.mlp, nn.Sequential) and layer.moe.residual.mlp is not expert
    assert not any(is_expert_param(p) for p in layer.moe.residual.parameters())


def test_flops_count_the_residual_branch():
    std, res = _cfg("--num-experts", "4"), _cfg("--num-experts", "4", "--mlp-type", "residual")
    h, f = 32, 128
    per_layer = 2 * 2 * h * f + 2 * h * 2  # dense MLP + coefficient, forward
    assert flops_per_token(res.model, res.moe) - flops_per_token(std.model, std.moe) == 3 * 3 * per_layer


def test_clip_grad_norm_takes_one_group_per_ep_size():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(3, 4)) for _ in range(4)]
    for p in ps:
        p.grad = torch.randn_like(p)
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    for p, r in zip(ps, ref):
        r.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    # (params, group) pairs; group None = local (EP 1 or a single process)
    got = clip_grad_norm(ps[:1], [(ps[1:2], None), (ps[2:], None)], 0.5)
    assert abs(got - float(want)) < 1e-5
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)  # fp32, same clip factor


# ---------------------------------------------------------------------------------------------- checkpoints
def _argv(corpus, tmp_path, *extra):
    return tiny_train_argv(corpus, tmp_path, "--num-layers", "4", "--train-iters", "2", "--eval-iters", "0", *extra)


def test_checkpoint_rejects_other_expert_counts_and_mlp_type(tiny_corpus, tmp_path):
    save = str(tmp_path / "ck")
    pretrain(_argv(tiny_corpus, tmp_path, "--num-experts", "4", "4", "--save", save))
    with pytest.raises(CheckpointError, match=r"--num-experts mismatch: .* has num_experts=\[4, 4\], "
                                              r"the training flags give \[4, 8\]"):
        pretrain(_argv(tiny_corpus, tmp_path, "--num-experts", "4", "8", "--load", save))
    with pytest.raises(CheckpointError, match=r"--mlp-type mismatch: .* has mlp_type=standard, "
                                              r"the training flags give residual"):
        pretrain(_argv(tiny_corpus, tmp_path, "--num-experts", "4", "4", "--mlp-type", "residual", "--load", save))


def test_residual_pyramid_checkpoint_round_trip(tiny_corpus, tmp_path):
    save = str(tmp_path / "ck")
    flags = ["--num-experts", "2", "4", "--mlp-type", "residual"]
    first = pretrain(_argv(tiny_corpus, tmp_path, *flags, "--save", save))["state"].model.state_dict()
    assert any(".mlp.residual.coefficient." in k for k in first)
    loaded = pretrain(_argv(tiny_corpus, tmp_path, *flags, "--load", save))["state"].model.state_dict()
    for k, v in first.items():
        assert torch.equal(v, loaded[k]), k
    with pytest.raises(CheckpointError, match="--mlp-type mismatch"):
        pretrain(_argv(tiny_corpus, tmp_path, "--num-experts", "2", "4", "--load", save))


def test_checkpoint_with_old_residual_names_loads():
    """Checkpoints written before the one MLP class named the Residual-MoE branch's linears fc1/fc2: load_model_state
    renames them, and the loaded branch holds those weights."""
    from megatron.checkpointing import load_model_state
    from megatron.config import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, seq_length=8,
                      max_position_embeddings=8, padded_vocab_size=32)
    moe_cfg = MoEConfig(num_experts=2, expert_interval=2, mlp_type="residual")
    torch.manual_seed(0)
    src, dst = GPTModel(cfg, moe_cfg), GPTModel(cfg, moe_cfg)
    old = {k.replace("residual.mlp.dense_h_to_4h.", "residual.mlp.fc1.").replace("residual.mlp.dense_4h_to_h.",
                                                                                  "residual.mlp.fc2."): v
           for k, v in src.state_dict().items() if ".experts." not in k}
    assert any(".residual.mlp.fc1." in k for k in old)
    load_model_state(dst, {"model": old}, "old_ckpt", load_experts=False)
    assert torch.equal(dst.layers[1].mlp.residual.mlp.dense_h_to_4h.weight, src.layers[1].mlp.residual.mlp.dense_h_to_4h.weight)
