"""Continued pretraining from a Hugging Face import (issue 26, deliverable 5), end to end through the CLIs:
transformers' own Qwen3MoeConfig / DeepseekV3Config, random weights, save_pretrained with a `tokenizers` BPE
tokenizer.json -> tools/convert_hf.py import -> tools/preprocess_data.py with HuggingFaceTokenizer ->
pretrain (--use-checkpoint-args --load IMPORT --finetune, 3 steps) at EP=2 on 2 gloo processes (and TP=2 x EP=2 on
4, slow) -> tools/convert_hf.py export -> AutoModelForCausalLM.from_pretrained.

Checks: the parallel run equals one process at EP=1 with the same micro-batches (micro-batch 2, two accumulation
steps = DP 2 x micro-batch 2: the same tokens in each micro-batch, so the same aux losses) and the exported
directory loads in transformers with logits equal to the trained checkpoint's.
"""
import importlib.util
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (requirements-test.txt)")

from megatron.hf_interop import load_whole_model  # noqa: E402
from megatron.training import pretrain  # noqa: E402
from tests.conftest import ROOT, synthetic_docs  # noqa: E402
from tests.dist.launcher import run_distributed_jobs  # noqa: E402
from tests.unit.test_convert_hf import cli  # noqa: E402  (tools/convert_hf.py)

# fp32 on CPU: export/transformers differ from ours only in reduction order (1e-5 on O(1) logits, see
# tests/unit/test_hf_families.py); EP=2 / TP=2 vs one process: the gradient sums in another order, then 3 Adam
# steps of lr 1e-3 (Adam's update is O(lr) whatever the gradient's size, so an fp32 difference in a near-zero
# gradient can move a weight by up to ~lr): 1e-4 on the logits after 3 steps, still far below a routing or layout
# mistake (O(1e-1))
ATOL_EXPORT = 1e-5
ATOL_PARALLEL = 1e-4


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hf_configs(vocab):
    common = dict(hidden_size=32, num_attention_heads=4, vocab_size=vocab, max_position_embeddings=64,
                  bos_token_id=None, eos_token_id=0, pad_token_id=None)
    tf = transformers
    return {"qwen3_moe": tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                                           num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                           norm_topk_prob=True, **common),
            "deepseek_v3": tf.DeepseekV3Config(
                intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_key_value_heads=4,
                n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_shared_experts=1, routed_scaling_factor=2.5, **common)}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{'data': indexed dataset prefix, 'qwen3_moe'/'deepseek_v3': (hf dir, import at EP 2), 'root': dir}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf_continue")
    docs = synthetic_docs(200)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab_size()
    assert vocab % 2 == 0  # TP 2 pads nothing, so the vocabulary equals config.json's (exact export)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = {"root": d}
    for name, cfg in _hf_configs(vocab).items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d / name)
        tok.save(str(d / name / "tokenizer.json"))
        save = str(d / f"{name}-ck")
        assert cli.main(["import", "--hf-dir", str(d / name), "--save", save, "--target-ep", "2"]) == 0
        out[name] = (str(d / name), save)
    assert _tool("preprocess_data").main(
        ["--input", str(d / "corpus.jsonl"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         str(d / "qwen3_moe"), "--append-eod", "--output-prefix", str(d / "data"), "--workers", "1"]) in (0, None)
    out["data"] = str(d / "data_text_document")
    return out


def _argv(imp, load, save, *extra):
    """--use-checkpoint-args: the architecture comes from the import; only data, batch and schedule are given."""
    return ["--use-checkpoint-args", "--load", load, "--finetune", "--save", save, "--save-interval", "3",
            "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
            "--data-path", imp["data"], "--split", "90,10,0", "--data-cache-path", str(imp["root"] / "cache"),
            "--num-workers", "0", "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1",
            "--peak-flops", "1e11", *extra]


def _train(rank, world_size, argv):
    r = pretrain(argv)
    r["state"].resources.close()
    return r["losses"]


def _one_process(imp, name, save):
    """The reference: one process, EP 1, micro-batch 2 x 2 accumulation steps (the DP=2 runs' micro-batches)."""
    r = pretrain(_argv(imp, imp[name][1], save, "--expert-model-parallel-size", "1"))
    r["state"].resources.close()
    return r["losses"]


def _export_and_compare(trained, out, vocab_ids):
    assert cli.main(["export", "--load", trained, "--save", out]) == 0
    ours, _ = load_whole_model(trained)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (hf(vocab_ids).logits - ours(vocab_ids).logits).abs().max().item()
    assert diff < ATOL_EXPORT, diff
    return ours


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _check(imp, name, parallel_ckpt, ref_ckpt, tag):
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    ours = _export_and_compare(parallel_ckpt, str(imp["root"] / f"{tag}-hf"), ids)
    imported, _ = load_whole_model(imp[name][1])
    moved = [k for k, v in ours.state_dict().items() if not torch.equal(v, imported.state_dict()[k])]
    assert any("experts" in k for k in moved) and any("router" in k for k in moved)  # it trained from the import
    ref, _ = load_whole_model(ref_ckpt)
    diff = (_logits(ours, ids) - _logits(ref, ids)).abs().max().item()
    assert diff < ATOL_PARALLEL, f"{tag}: {diff}"


def test_continue_training_at_ep2_then_export_loads_in_transformers(imported, tmp_path):
    imp = imported
    ep2 = {n: str(tmp_path / f"{n}-ep2") for n in ("qwen3_moe", "deepseek_v3")}
    losses = run_distributed_jobs([(_train, (_argv(imp, imp[n][1], ep2[n], "--expert-model-parallel-size", "2"),))
                                   for n in ep2], 2)
    for (name, save), per_rank in zip(ep2.items(), losses):
        ref = str(tmp_path / f"{name}-ep1")
        ref_losses = _one_process(imp, name, ref)
        # the logged training losses: same micro-batches, fp32 sums in another order
        assert torch.allclose(torch.tensor(per_rank[0]), torch.tensor(ref_losses), atol=1e-5), (per_rank, ref_losses)
        _check(imp, name, save, ref, f"{name}-ep2")


@pytest.mark.slow  # a 4-process spawn (~25 s on 2 cores)
def test_continue_training_at_tp2_ep2_then_export_loads_in_transformers(imported, tmp_path):
    imp = imported
    hf_dir, _ = imp["qwen3_moe"]
    load = str(tmp_path / "tp2")
    assert cli.main(["import", "--hf-dir", hf_dir, "--save", load, "--target-tp", "2", "--target-ep", "2"]) == 0
    flags = open(os.path.join(load, "hf_import_flags.txt")).read()
    assert "--tensor-model-parallel-size 2" in flags and "--expert-model-parallel-size 2" in flags
    save = str(tmp_path / "tp2-trained")
    (losses,) = run_distributed_jobs([(_train, (_argv(imp, load, save),))], 4)
    ref = str(tmp_path / "ep1")
    ref_losses = _one_process(imp, "qwen3_moe", ref)
    assert torch.allclose(torch.tensor(losses[0]), torch.tensor(ref_losses), atol=1e-5), (losses, ref_losses)
    _check(imp, "qwen3_moe", save, ref, "tp2ep2")
