"""tools/convert_hf.py: GPT-2 import/export against transformers' own GPT2LMHeadModel, and the MoE safetensors
round trip. Models are random-initialised from a small GPT2Config (no download); logits compared in fp32."""
import dataclasses
import importlib.util
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (requirements-test.txt)")

from megatron import checkpointing  # noqa: E402
from megatron.config import ModelConfig  # noqa: E402
from megatron.hf_interop import load_whole_model  # noqa: E402
from megatron.model import GPTModel  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

spec = importlib.util.spec_from_file_location("convert_hf", os.path.join(ROOT, "tools", "convert_hf.py"))
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
# fp32 on CPU, two layers: the two implementations differ only in summation order (SDPA vs GPT-2's attention,
# Conv1D's addmm vs linear), well under 1e-5 in the logits
ATOL = 1e-5


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _hf_model(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=101,
                                  layer_norm_epsilon=1e-5, **overrides)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a missed transpose or bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    return model, str(d)


@torch.no_grad()
def test_import_gpt2_logits_equal_transformers(tmp_path, capsys):
    hf, d = _hf_model(tmp_path)
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0, capsys.readouterr().err
    ours, configs = load_whole_model(str(tmp_path / "ck"))
    assert ours.cfg.padded_vocab_size == 101 and ours.cfg.ffn_hidden_size == 128  # exact vocabulary; 4h
    ids = _ids(101)
    diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < ATOL, diff


@torch.no_grad()
def test_export_dense_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, capsys):
    torch.manual_seed(1)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=64,
                      max_position_embeddings=64, padded_vocab_size=128, layernorm_epsilon=1e-5)
    model = GPTModel(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.add_(torch.randn_like(p) * 0.1)
    configs = {"model": dataclasses.asdict(cfg), "moe": None, "tokenizer": {"tokenizer_type": "GPT2BPETokenizer"}}
    checkpointing.save_checkpoint(str(tmp_path / "ck"), 3, model, None, None, None, {}, configs)
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "out")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    assert hf.config.n_inner == 48 and hf.config.vocab_size == 128
    ids = _ids(128, seed=1)
    diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < ATOL, diff
    # and back: importing the export reproduces the checkpoint's weights exactly
    assert cli.main(["import", "--hf-dir", str(tmp_path / "out"), "--save", str(tmp_path / "back")]) == 0
    back, _ = load_whole_model(str(tmp_path / "back"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_unsupported_gpt2_variants_refused_with_one_line(tmp_path, capsys):
    _, d = _hf_model(tmp_path, activation_function="gelu")
    capsys.readouterr()  # transformers' own save progress
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "activation_function 'gelu'" in err and "tanh approximation" in err


@torch.no_grad()
def test_moe_exports_as_safetensors_reloadable_and_gpt2_refused(tmp_path, capsys):
    from moe.config import MoEConfig

    torch.manual_seed(2)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=32,
                      max_position_embeddings=32, padded_vocab_size=64)
    # deterministic routing, so two forwards of the same weights can be compared (DeepSpeed's default samples the
    # second expert with Gumbel noise, in eval too)
    moe = MoEConfig(num_experts=4, expert_interval=2, topk=2, drop_tokens=False, second_expert_sampling=False)
    model = GPTModel(cfg, moe).eval()
    configs = {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe),
               "tokenizer": {"tokenizer_type": "GPT2BPETokenizer"}}
    checkpointing.save_checkpoint(str(tmp_path / "ck"), 5, model, None, None, None, {}, configs)
    capsys.readouterr()
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "x"), "--format",
                     "gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a MoE checkpoint: GPT-2 has no experts" in err
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "st")]) == 0  # auto
    assert json.load(open(tmp_path / "st" / "megatron_config.json"))["moe"]["num_experts"] == [4]
    assert cli.main(["import", "--hf-dir", str(tmp_path / "st"), "--save", str(tmp_path / "back")]) == 0
    back, _ = load_whole_model(str(tmp_path / "back"))
    ids = _ids(64, seed=2)
    assert torch.equal(back(ids).logits, model(ids).logits)  # the same weights, experts included: bit-exact
