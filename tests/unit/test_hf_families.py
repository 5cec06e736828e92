"""tools/convert_hf.py for the Llama-style families (issue 26) against transformers' own AutoModelForCausalLM.

Each family is a random-initialised tiny config made with transformers' config class, saved with save_pretrained
(per-expert Hub names; one family in several shards) and imported with the CLI; then exported and loaded back by
AutoModelForCausalLM. Everything is fp32 on CPU with the same weights: the two implementations differ only in the
order of their reductions (fused vs split projections, SDPA vs eager attention, grouped vs per-expert GEMMs), so
logits of O(1) agree to 1e-5 (about 100 ulps; a layout or routing mistake shows as O(1e-1)). Routing is compared
implicitly: a different expert choice would move logits far beyond that.
"""
import json
import os
import shlex

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (requirements-test.txt)")

from megatron.checkpointing import model_configs_from_checkpoint  # noqa: E402
from megatron.hf_interop import load_whole_model  # noqa: E402
from megatron.inference import generate  # noqa: E402
from tests.unit.test_convert_hf import cli  # noqa: E402  (tools/convert_hf.py loaded as a module)

ATOL = 1e-5  # fp32 round-off, see the module docstring
V = 96


def _configs():
    tf = transformers
    common = dict(hidden_size=32, num_attention_heads=4, vocab_size=V, max_position_embeddings=64,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {
        "llama": tf.LlamaConfig(intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2, **common),
        "llama-mha-tied": tf.LlamaConfig(intermediate_size=48, num_hidden_layers=2, num_key_value_heads=4,
                                         tie_word_embeddings=True, **common),
        "qwen3_moe": tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                                       num_key_value_heads=2, head_dim=12, num_experts=6, num_experts_per_tok=2,
                                       mlp_only_layers=[0], norm_topk_prob=True, **common),
        "qwen3_moe-no-renorm-step2": tf.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, num_key_value_heads=1, head_dim=8,
            num_experts=4, num_experts_per_tok=3, decoder_sparse_step=2, norm_topk_prob=False, **common),
        "mixtral": tf.MixtralConfig(intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2,
                                    num_local_experts=4, num_experts_per_tok=2, **common),
        "qwen2_moe": tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=24, num_hidden_layers=2,
                                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **common),
        "olmoe": tf.OlmoeConfig(intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2, num_experts=4,
                                num_experts_per_tok=2, **common),
        "deepseek_v3": tf.DeepseekV3Config(
            intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_key_value_heads=4,
            n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_shared_experts=1, routed_scaling_factor=2.5, rope_interleave=True, **common),
        "deepseek_v3-q-full": tf.DeepseekV3Config(
            intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_key_value_heads=4,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_shared_experts=2, **common),
    }


def _hf_dir(tmp_path, name, shard=None):
    """A saved random transformers model of config `name` (weights moved off their init so nothing is trivial)."""
    cfg = _configs()[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in n else 0.0))
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:  # DeepSeek-V3's expert bias: changes the choice, not the weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    d = tmp_path / "hf"
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    return model, str(d)


def _ids(seed=0):
    return torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(seed))


def _check_sha256sums(out):
    """The export's SHA256SUMS lists every other file of the directory with its SHA-256 (hashlib, independently)."""
    import hashlib

    listed = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in open(out / "SHA256SUMS"))
    assert sorted(listed) == sorted(n for n in os.listdir(out) if n != "SHA256SUMS")
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def _check_import_manifest(save):
    """The import is a checkpoint as the checkpointing package writes one: per-expert files, checksums.json listing
    every file with its xxh3-64, each verified by the loader's own check."""
    from megatron import checkpointing
    from megatron.checkpointing.integrity import load_checkpoint_file, read_manifest

    ckpt_dir, _ = checkpointing.resolve_checkpoint_dir(str(save))
    files = read_manifest(ckpt_dir)
    on_disk = {os.path.relpath(os.path.join(d, n), ckpt_dir) for d, _, ns in os.walk(ckpt_dir) for n in ns}
    assert set(files) == on_disk - {"checksums.json"}
    for rel in files:
        load_checkpoint_file(ckpt_dir, os.path.join(ckpt_dir, rel))  # raises CorruptCheckpointError on a mismatch
    assert not [n for n in os.listdir(save) if n.startswith(".")]  # no scratch file or temporary root left


@pytest.mark.parametrize("name", list(_configs()))
@torch.no_grad()
def test_import_then_export_logits_equal_transformers(tmp_path, capsys, name):
    hf, d = _hf_dir(tmp_path, name, shard="20KB" if name == "qwen3_moe" else None)
    if name == "qwen3_moe":
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))  # the sharded read path
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0, capsys.readouterr().err
    ours, configs = load_whole_model(str(tmp_path / "ck"))
    ids = _ids()
    want = hf(ids).logits
    diff = (ours(ids).logits - want).abs().max().item()
    assert diff < ATOL, f"{name} import: {diff}"
    assert configs["hf_config"]["architectures"] == hf.config.architectures
    _check_import_manifest(tmp_path / "ck")
    # export (auto: the imported architecture), then transformers loads it with the same logits
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "out"),
                     "--max-shard-size-gb", "0.00002"]) == 0, capsys.readouterr().err
    _check_sha256sums(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    assert type(back) is type(hf)
    diff = (back(ids).logits - want).abs().max().item()
    assert diff < ATOL, f"{name} export: {diff}"


@pytest.mark.parametrize("name", [n for n in _configs() if "-" not in n])
def test_recorded_training_flags_rebuild_the_imported_configs(tmp_path, name):
    """The pretrain_gpt.py flags written beside the import (hf_import_flags.txt) parse into the same ModelConfig and
    MoEConfig, so --load IMPORT --finetune with them resumes the model (the resume check compares these fields)."""
    import dataclasses

    from megatron.arguments import model_config_from_args, moe_config_from_args, parse_args
    from megatron.config import ModelConfig
    from moe.config import MoEConfig

    _, d = _hf_dir(tmp_path, name)
    ep = [] if name == "llama" else ["--target-ep", "2"]
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")] + ep) == 0
    flags = shlex.split(open(tmp_path / "ck" / "hf_import_flags.txt").read())  # quoted for a shell
    _, configs = load_whole_model(str(tmp_path / "ck"))
    args = parse_args(flags + ["--train-iters", "1"])
    model = model_config_from_args(args, configs["model"]["padded_vocab_size"])
    want = ModelConfig.from_recorded(configs["model"])
    assert dataclasses.replace(model, seq_length=want.seq_length) == want
    moe = moe_config_from_args(args)
    assert (moe is None) == (configs["moe"] is None)
    if moe is not None:
        assert moe == MoEConfig.from_recorded(configs["moe"])


def _configs_of(argv):
    from megatron.arguments import model_config_from_args, moe_config_from_args, parse_args

    args = parse_args(argv + ["--train-iters", "1"])
    return args, model_config_from_args(args, V), moe_config_from_args(args)


def test_use_checkpoint_args_takes_the_recorded_architecture(tmp_path, capsys):
    """--use-checkpoint-args --load IMPORT builds the imported configs with no model flags; a flag given on the command
    line wins (and the resume check then names it); a checkpoint trained here whose blocks a family computes (no
    recorded flags) gets the same flags made from its configs; one no family computes is refused in one line."""
    import dataclasses

    from megatron import checkpointing
    from megatron.config import ModelConfig
    from megatron.hf.configs import recorded
    from megatron.model import GPTModel
    from moe.config import MoEConfig

    _, d = _hf_dir(tmp_path, "qwen3_moe")
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck"), "--target-ep", "2"]) == 0
    _, configs = load_whole_model(str(tmp_path / "ck"))
    args, model, moe = _configs_of(["--use-checkpoint-args", "--load", str(tmp_path / "ck")])
    want = ModelConfig.from_recorded(configs["model"])
    assert dataclasses.replace(model, seq_length=want.seq_length) == want
    assert moe == MoEConfig.from_recorded(configs["moe"]) and moe.ep_size == (2,)
    args, _, moe = _configs_of(["--use-checkpoint-args", "--load", str(tmp_path / "ck"),
                                "--expert-model-parallel-size", "1"])
    assert moe.ep_size == (1,)  # the command line comes after the recorded flags
    # trained here with Qwen3-MoE's blocks: flags made from the recorded configs
    cfg, moe = want, MoEConfig.from_recorded(configs["moe"], ep_size=1)
    checkpointing.save_checkpoint(str(tmp_path / "here"), 5, GPTModel(cfg, moe, None), None, None, None, {},
                                  recorded(cfg, moe))  # no training_flags, no hf_config
    _, got, got_moe = _configs_of(["--use-checkpoint-args", "--load", str(tmp_path / "here")])
    assert dataclasses.replace(got, seq_length=cfg.seq_length) == cfg and got_moe == moe
    # DeepSpeed routing (capacity, RTS) is no family's: one line
    moe = MoEConfig(num_experts=4, topk=2, layer_freq=1)
    checkpointing.save_checkpoint(str(tmp_path / "ds"), 1, GPTModel(cfg, moe, None), None, None, None, {},
                                  recorded(cfg, moe))
    from megatron.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^--use-checkpoint-args: .* records no training flags and its model is "
                                          r"not a Hugging Face family's \(.*\); give the architecture flags instead$"):
        _configs_of(["--use-checkpoint-args", "--load", str(tmp_path / "ds")])


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
@torch.no_grad()
def test_bf16_safetensors_import_exactly(tmp_path, name):
    """bf16 shards (as the Hub's): the dense part is laid out in bf16 and converted by the parameters' copy_, the
    experts in fp32; both exact, so the logits equal the fp32 transformers model holding the same bf16 values."""
    hf, d = _hf_dir(tmp_path, name)
    for p in hf.parameters():
        p.copy_(p.to(torch.bfloat16).float())
    import copy
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # hf keeps its fp32 buffers (RoPE)
    assert cli.main(["import", "--hf-dir", str(tmp_path / "bf16"), "--save", str(tmp_path / "ck")]) == 0
    ours, _ = load_whole_model(str(tmp_path / "ck"))
    assert all(t.dtype == torch.float32 for t in ours.state_dict().values() if t.is_floating_point())
    ids = _ids()
    assert (ours(ids).logits - hf(ids).logits).abs().max().item() < ATOL


@torch.no_grad()
def test_import_reads_fused_expert_tensors(tmp_path):
    """transformers 5's in-memory form (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]) in the
    safetensors imports like the Hub's per-expert form."""
    from safetensors.torch import load_file, save_file

    hf, d = _hf_dir(tmp_path, "qwen2_moe")
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        n = hf.config.num_experts
        sd[p + "gate_up_proj"] = torch.stack([torch.cat((sd.pop(f"{p}{e}.gate_proj.weight"),
                                                         sd.pop(f"{p}{e}.up_proj.weight"))) for e in range(n)])
        sd[p + "down_proj"] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(n)])
    save_file(sd, path, metadata={"format": "pt"})
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0
    ours, _ = load_whole_model(str(tmp_path / "ck"))
    ids = _ids()
    assert (ours(ids).logits - hf(ids).logits).abs().max().item() < ATOL


@torch.no_grad()
def test_import_for_target_tp_and_ep(tmp_path, capsys):
    """--target-tp 2 writes two TP shards (tools/checkpoint_tp.py), --target-ep 2 is recorded; merged back they
    compute transformers' logits. A size the model cannot be split by is one line."""
    from megatron import checkpointing

    hf, d = _hf_dir(tmp_path, "qwen2_moe")
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck"), "--target-tp", "2",
                     "--target-ep", "2"]) == 0, capsys.readouterr().err
    ckpt_dir, _ = checkpointing.resolve_checkpoint_dir(str(tmp_path / "ck"))
    assert checkpointing.num_tp_shards(ckpt_dir) == 2
    ours, configs = load_whole_model(str(tmp_path / "ck"))
    assert list(configs["moe"]["ep_size"]) == [2]
    ids = _ids()
    assert (ours(ids).logits - hf(ids).logits).abs().max().item() < ATOL
    capsys.readouterr()
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "bad"), "--target-ep", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--target-ep 3: the expert count (4) is not divisible by it" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
@torch.no_grad()
def test_greedy_generation_tokens_equal_transformers(tmp_path, name):
    """32 new tokens, KV-cached decode (megatron.inference.generate, what tools/generate.py runs) vs transformers'
    greedy generate: identical token ids (a near-tie between two tokens would need logits within ~1e-5)."""
    hf, d = _hf_dir(tmp_path, name)
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0
    ours, _ = load_whole_model(str(tmp_path / "ck"))
    prompt = _ids(3)[0, :6].tolist()
    mine = generate(ours, prompt, 32, temperature=0.0)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert mine == theirs[0, len(prompt):].tolist()


def test_generate_cli_text_equals_transformers(tmp_path, capsys):
    """tools/generate.py --temperature 0 on an import with a byte-level BPE tokenizer.json prints the prompt and the
    text of transformers' 32 greedy tokens (both stop at the end-of-document token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.conftest import ROOT, synthetic_docs
    import importlib.util

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(synthetic_docs(50), trainers.BpeTrainer(
        vocab_size=V, special_tokens=["<|endoftext|>"]))  # the corpus' bytes only: V is small
    assert tok.get_vocab_size() <= V
    hf, d = _hf_dir(tmp_path, "qwen3_moe")
    tok.save(os.path.join(d, "tokenizer.json"))
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0
    spec = importlib.util.spec_from_file_location("generate_tool", os.path.join(ROOT, "tools", "generate.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    prompt = "the cat sat"
    capsys.readouterr()
    assert tool.main(["--load", str(tmp_path / "ck"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens",
                      "32", "--no-progress"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    eod = tok.token_to_id("<|endoftext|>")
    out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eod)[0, len(ids):]
    new = out.tolist()[:out.tolist().index(eod) + 1] if eod in out.tolist() else out.tolist()  # both print it
    assert len(new) >= 8 and printed == tok.decode(ids + new, skip_special_tokens=False), (printed, new)


@torch.no_grad()
def test_export_of_a_model_trained_here_as_qwen3_moe(tmp_path):
    """A checkpoint written by this project with Qwen3-MoE's blocks (no HF origin) exports under the implied
    architecture; transformers' logits equal ours."""
    from megatron import checkpointing
    from megatron.config import ModelConfig
    from megatron.hf.configs import recorded
    from megatron.model import GPTModel
    from moe.config import MoEConfig

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=32,
                      max_position_embeddings=32, padded_vocab_size=V, position_embedding_type="rope",
                      normalization="RMSNorm", activation="swiglu", num_query_groups=2, kv_channels=8,
                      qk_layernorm=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
                      hidden_dropout=0.0, attention_dropout=0.0, rotary_base=1e6)
    moe = MoEConfig(num_experts=4, topk=2, layer_freq=1, moe_ffn_hidden_size=16, router_family="megatron")
    model = GPTModel(cfg, moe, None).eval()
    checkpointing.save_checkpoint(str(tmp_path / "ck"), 5, model, None, None, None, {}, recorded(cfg, moe))
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "out")]) == 0
    hf_cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert hf_cfg["architectures"] == ["Qwen3MoeForCausalLM"] and hf_cfg["norm_topk_prob"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = _ids(2)
    assert (hf(ids).logits - model(ids).logits).abs().max().item() < ATOL
    # --dtype bfloat16 writes bf16 tensors and says so in config.json
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "bf16"),
                     "--dtype", "bfloat16"]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"


def test_target_tp_refusals_are_one_line(tmp_path, capsys):
    _, d = _hf_dir(tmp_path, "olmoe")
    capsys.readouterr()
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck"), "--target-tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--target-tp 2: OLMoE's whole-projection q/k norms need TP 1" in err and len(err.splitlines()) == 1, err
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck"), "--target-tp", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--target-tp 3: num_attention_heads (4) is not divisible by it" in err, err


def test_tokenizer_json_recorded_as_huggingface_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron.tokenizer import build_tokenizer

    _, d = _hf_dir(tmp_path, "llama")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["</s>", "<unk>", "hello", "world"])}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0
    _, configs = load_whole_model(str(tmp_path / "ck"))
    t = configs["tokenizer"]
    assert t["tokenizer_type"] == "HuggingFaceTokenizer" and t["tokenizer_model"] == os.path.abspath(d)
    assert build_tokenizer(t["tokenizer_type"], tokenizer_model=t["tokenizer_model"]).tokenize("hello world") == [2, 3]
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "out")]) == 0
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")  # copied beside the weights


def _edit_config(d, **changes):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


@pytest.mark.parametrize("name,changes,needle", [
    ("llama", {"architectures": ["FalconForCausalLM"]}, "architecture 'FalconForCausalLM' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                   "original_max_position_embeddings": 16}}, "rope_type 'yarn'"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("mixtral", {"sliding_window": 16}, "sliding_window 16"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise 0.1"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8}, "sliding_window 8"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv 8.0"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob false with num_experts_per_tok 4"),
    ("deepseek_v3", {"topk_group": 1}, "topk_group 1 != 2"),
])
def test_unmapped_config_fields_refused_in_one_line(tmp_path, capsys, name, changes, needle):
    _, d = _hf_dir(tmp_path, name)
    _edit_config(d, **changes)
    capsys.readouterr()  # save_pretrained's progress bar
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "ck")


def test_missing_shard_and_missing_tensor_refused_in_one_line(tmp_path, capsys):
    _, d = _hf_dir(tmp_path, "qwen3_moe", shard="20KB")
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    os.remove(os.path.join(d, sorted(set(index["weight_map"].values()))[-1]))
    capsys.readouterr()
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is missing" in err and "shard model-" in err and len(err.splitlines()) == 1, err
    # an index naming a tensor nowhere: the tensor is named
    _, d2 = _hf_dir(tmp_path / "b", "llama")
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(d2, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, os.path.join(d2, "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli.main(["import", "--hf-dir", d2, "--save", str(tmp_path / "ck2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.1.mlp.up_proj.weight is missing" in err and len(err.splitlines()) == 1, err


def test_missing_expert_tensor_leaves_no_checkpoint(tmp_path, capsys):
    """Experts are written after the rest (one at a time); a missing one is one line and nothing is left in --save
    (no tracker, no iteration directory, no temporary root)."""
    from safetensors.torch import load_file, save_file

    _, d = _hf_dir(tmp_path, "mixtral")
    sd = load_file(os.path.join(d, "model.safetensors"))
    del sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert "experts.3.w2.weight is missing" in err and len(err.splitlines()) == 1, err
    assert os.listdir(tmp_path / "ck") == []


def test_export_refuses_a_model_no_family_computes(tmp_path, capsys):
    from megatron import checkpointing
    from megatron.config import ModelConfig
    from megatron.hf.configs import recorded
    from megatron.model import GPTModel
    from moe.config import MoEConfig

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=32,
                      max_position_embeddings=32, padded_vocab_size=V, position_embedding_type="rope",
                      normalization="RMSNorm", activation="swiglu", add_bias_linear=False)
    moe = MoEConfig(num_experts=4, topk=2, layer_freq=1)  # DeepSpeed routing (capacity, RTS): no HF equivalent
    checkpointing.save_checkpoint(str(tmp_path / "ck"), 1, GPTModel(cfg, moe, None), None, None, None, {},
                                  recorded(cfg, moe))
    capsys.readouterr()
    assert cli.main(["export", "--load", str(tmp_path / "ck"), "--save", str(tmp_path / "out"), "--format", "hf",
                     "--architecture", "MixtralForCausalLM"]) == 2
    err = capsys.readouterr().err.strip()
    assert "export as MixtralForCausalLM: router_family deepspeed" in err and len(err.splitlines()) == 1, err
    mcfg, _ = model_configs_from_checkpoint(recorded(cfg, moe), str(tmp_path))
    assert mcfg == cfg


@pytest.mark.slow  # ~25 s on 2 cores (the SentencePiece corpus fixture and a 2-step run)
def test_continue_training_an_import_then_export_loads_in_transformers(tiny_corpus, tmp_path, capsys):
    """Import a Qwen3-MoE, train 2 steps from it with the recorded flags (pretrain in-process, --finetune), export
    the result: transformers loads it and its logits equal the trained checkpoint's (1e-5, fp32 round-off)."""
    from megatron.training import pretrain

    vocab = tiny_corpus["tokenizer"].vocab_size
    cfg = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, vocab_size=vocab,
                                      max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    assert cli.main(["import", "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")]) == 0
    flags = shlex.split(open(tmp_path / "ck" / "hf_import_flags.txt").read())
    data = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "2",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tiny_corpus["tokenizer_model"],
            "--data-path", tiny_corpus["prefix"], "--split", "90,10,0", "--data-cache-path", str(tmp_path / "cache"),
            "--num-workers", "0", "--eval-interval", "1000", "--eval-iters", "1", "--peak-flops", "1e11",
            "--load", str(tmp_path / "ck"), "--finetune", "--save", str(tmp_path / "trained"), "--save-interval", "2"]
    r = pretrain(flags + data)
    r["state"].resources.close()
    trained, _ = load_whole_model(str(tmp_path / "trained"))
    imported, _ = load_whole_model(str(tmp_path / "ck"))
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, imported.state_dict()[k])]
    assert any("experts" in k for k in moved) and any("router" in k for k in moved)  # it trained from the import
    capsys.readouterr()
    assert cli.main(["export", "--load", str(tmp_path / "trained"), "--save", str(tmp_path / "out")]) == 0, \
        capsys.readouterr().err
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(ids).logits - trained(ids).logits).abs().max().item() < ATOL
