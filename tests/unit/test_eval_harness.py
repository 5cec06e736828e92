"""megatron/eval/harness.py: the lm-eval model `megatron_moe` against independent references.

- lm_eval with this model and tools/eval_zeroshot.py give the same LAMBADA (OpenAI) and PIQA numbers on one
  checkpoint, through the harness's own task configs pointed at the local files (in process here; through the
  harness's command line in the slow test);
- loglikelihood_rolling equals a hand-written disjoint-window loop (float64 copy of the model);
- generate_until equals a brute-force greedy loop without KV cache, cut at the first stop sequence;
- a tensor-parallel (TP=2) checkpoint answers as its merged TP=1 form;
- MoE checkpoints: dropless by default (batch-independent), recorded in the results' config.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install -r requirements-test.txt)")

from lm_eval.api.instance import Instance  # noqa: E402

import megatron.eval.harness as harness  # noqa: E402
from megatron.eval.runner import EvalConfig, run_zeroshot  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.unit.test_eval_cli import real_data_dir, save_tiny_checkpoint  # noqa: E402,F401

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def save_gpt2_checkpoint(root, moe=None):
    """A random-init 2-layer GPT with the real GPT-2 BPE (the tokenizer LAMBADA/PIQA numbers are published with)."""
    import dataclasses

    from megatron import checkpointing
    from megatron.config import ModelConfig
    from megatron.data.data_files import resolve
    from megatron.model import GPTModel

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=128,
                      max_position_embeddings=128, padded_vocab_size=50304, hidden_dropout=0.0,
                      attention_dropout=0.0)
    model = GPTModel(cfg, moe)
    configs = {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe) if moe else None,
               "tokenizer": {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(resolve("gpt2-vocab")),
                             "merge_file": str(resolve("gpt2-merges")), "tokenizer_model": None,
                             "make_vocab_size_divisible_by": 128}}
    checkpointing.save_checkpoint(str(root), 1, model, None, None, None, {}, configs)
    return str(root)


def _native(ckpt, data_dir, limit, mbs=8):
    report = run_zeroshot(EvalConfig(load=ckpt, data_dir=data_dir, limit=limit, micro_batch_size=mbs,
                                     progress=False, bootstrap_iters=10))
    return {(r["task"], r["metric"]): r["value"] for r in report["results"]}, report


def _harness_values(results):
    got = results["results"]
    return {("lambada", "acc"): got["lambada_openai_local"]["acc,none"],
            ("lambada", "ppl"): got["lambada_openai_local"]["perplexity,none"],
            ("piqa", "acc"): got["piqa_local"]["acc,none"], ("piqa", "acc_norm"): got["piqa_local"]["acc_norm,none"]}


def _assert_same(native, harn):
    """Accuracies identical; perplexity to 1e-6 relative (both routes run the same scorer on the same requests:
    bit-identical for a dense model, fp32 rounding only for a dropless MoE expert GEMM whose row count varies)."""
    for key in (("lambada", "acc"), ("piqa", "acc"), ("piqa", "acc_norm")):
        assert harn[key] == native[key], key
    assert harn[("lambada", "ppl")] == pytest.approx(native[("lambada", "ppl")], rel=1e-6)


def test_model_is_registered_on_import():
    from lm_eval.api.registry import get_model

    assert get_model("megatron_moe") is harness.MegatronMoELM


def test_simple_evaluate_equals_eval_zeroshot_on_lambada_and_piqa(tmp_path, real_data_dir):  # noqa: F811
    ckpt = save_gpt2_checkpoint(tmp_path / "ck")
    include = harness.local_task_configs(tmp_path / "tasks", real_data_dir)
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="megatron_moe", model_args=f"load={ckpt},batch_size=16",
                                      tasks=["lambada_openai_local", "piqa_local"], limit=6, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=include, include_defaults=False))
    native, _ = _native(ckpt, real_data_dir, 6)
    _assert_same(native, _harness_values(results))
    info = results["config"]["megatron_moe"]
    assert info["batch_size"] == 16 and info["moe"] is None and info["dtype"] == "fp32"


def _tiny_lm(tmp_path, tiny_corpus, moe=None, **kw):
    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"], moe)
    return harness.MegatronMoELM.create_from_arg_string(f"load={ckpt},device=cpu",
                                                        {"batch_size": kw.pop("batch_size", 4), **kw}), ckpt


def test_loglikelihood_rolling_equals_disjoint_window_loop(tmp_path, tiny_corpus):
    lm, _ = _tiny_lm(tmp_path, tiny_corpus)
    lm = harness.MegatronMoELM.create_from_arg_string(f"load={lm.load},max_length=16,batch_size=3")
    text = " ".join(["The cat sees the door. A dog finds an apple by the river."] * 3)
    tokens = lm.tokenizer.tokenize(text)
    assert len(tokens) > 2 * 16  # at least three windows
    ref_model = copy.deepcopy(lm.model).double()

    @torch.no_grad()
    def score(inp, targets):  # sum of log p(targets) at the last len(targets) positions of inp (float64)
        logp = F.log_softmax(ref_model(torch.tensor([inp])).logits[0].double(), -1)[-len(targets):]
        return float(logp.gather(1, torch.tensor(targets).unsqueeze(1)).sum())

    # windows of W = 16 predicted tokens: the first conditions on the end-of-document token, each later one on the
    # single token before it; the last (shorter) one sees a full window of W input tokens
    W, eod, ref, n = 16, lm.tokenizer.eod, 0.0, len(tokens)
    for start in range(0, n, W):
        end = min(start + W, n)
        if start == 0:
            ref += score([eod] + tokens[:end - 1], tokens[:end])
        else:
            ref += score(tokens[end - W - 1:end - 1], tokens[start:end])
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (got,) = lm.loglikelihood_rolling([req], disable_tqdm=True)
    assert got == pytest.approx(ref, rel=1e-5)  # fp32 model vs float64 reference


def _greedy_reference(model, ids, n):
    ids, out = list(ids), []
    for _ in range(n):  # no KV cache: the whole prefix every step
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def test_generate_until_greedy_and_stop_sequences_equal_brute_force(tmp_path, tiny_corpus):
    lm, _ = _tiny_lm(tmp_path, tiny_corpus)
    tok = lm.tokenizer
    ctx = "The old man walks to"
    ref_ids = _greedy_reference(lm.model, tok.tokenize(ctx), 12)
    ref_ids = ref_ids[:ref_ids.index(tok.eod)] if tok.eod in ref_ids else ref_ids
    full = tok.detokenize(ref_ids)
    stop = full.strip()[2:4] or "e"  # a stop sequence that occurs inside the greedy continuation
    reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(ctx, {"until": [], "max_gen_toks": 12, "do_sample": False})),
            Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(ctx, {"until": [stop], "max_gen_toks": 12, "do_sample": False}))]
    got = lm.generate_until(reqs, disable_tqdm=True)
    assert got[0] == full
    assert got[1] == full.split(stop)[0] and len(got[1]) < len(full)


def test_generate_until_sampling_is_seeded(tmp_path, tiny_corpus):
    lm, ckpt = _tiny_lm(tmp_path, tiny_corpus)
    req = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=("A dog", {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": True,
                                        "temperature": 1.0}))
    again = harness.MegatronMoELM.create_from_arg_string(f"load={ckpt}")
    assert lm.generate_until([req], True) == again.generate_until([req], True)  # same seed, same draws
    other = harness.MegatronMoELM.create_from_arg_string(f"load={ckpt},seed=7")
    assert len({lm.generate_until([req] * 3, True)[k] for k in range(3)} | set(other.generate_until([req], True))) > 1


def test_tensor_parallel_checkpoint_answers_like_its_merged_form(tmp_path, tiny_corpus):
    lm, ckpt = _tiny_lm(tmp_path, tiny_corpus)
    tp2 = tmp_path / "tp2"
    import importlib.util

    spec = importlib.util.spec_from_file_location("checkpoint_tp_cli", os.path.join(ROOT, "tools", "checkpoint_tp.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--load", ckpt, "--save", str(tp2), "--target-tp", "2"]) == 0
    assert os.path.exists(tp2 / "iter_0000001" / "mp_rank_01")
    lm2 = harness.MegatronMoELM.create_from_arg_string(f"load={tp2},batch_size=4")
    reqs = [Instance(request_type="loglikelihood", doc={}, idx=0, arguments=(c, x))
            for c, x in (("The cat", " sees the door."), ("A dog likes", " an apple."), ("", "The king."))]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs, True), lm2.loglikelihood(reqs, True)):
        assert a == pytest.approx(b, rel=1e-6) and ga == gb  # merged shards: the same weights, same numbers


def test_moe_dropless_by_default_and_recorded(tmp_path, tiny_corpus):
    from moe.config import MoEConfig

    moe = MoEConfig(num_experts=4, expert_interval=2, topk=1, eval_capacity_factor=0.5)
    lm, ckpt = _tiny_lm(tmp_path, tiny_corpus, moe)
    assert lm.get_model_info()["megatron_moe"]["moe"] == {"routing": "dropless", "drop_tokens": False,
                                                         "eval_capacity_factor": None}
    dropping = harness.MegatronMoELM.create_from_arg_string(f"load={ckpt},dropless=false")
    assert dropping.get_model_info()["megatron_moe"]["moe"]["drop_tokens"] is True
    cf = harness.MegatronMoELM.create_from_arg_string(f"load={ckpt},eval_capacity_factor=2.0")
    assert cf.get_model_info()["megatron_moe"]["moe"]["eval_capacity_factor"] == 2.0
    with pytest.raises(ValueError, match="eval_capacity_factor asks for token dropping; drop dropless=true"):
        harness.MegatronMoELM.create_from_arg_string(f"load={ckpt},dropless=true,eval_capacity_factor=2.0")
    reqs = [Instance(request_type="loglikelihood", doc={}, idx=0, arguments=(f"The cat {i}", " sees the door."))
            for i in range(10)]
    one = harness.MegatronMoELM.create_from_arg_string(f"load={ckpt},batch_size=1")
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs, True), one.loglikelihood(reqs, True)):
        assert a == pytest.approx(b, rel=1e-6) and ga == gb  # dropless: the batch does not change a request


@pytest.mark.slow
def test_harness_cli_equals_eval_zeroshot_dense_and_moe(tmp_path, real_data_dir):  # noqa: F811
    """The user's route: `python -m megatron.eval.harness` (lm_eval's own CLI) vs tools/eval_zeroshot.py."""
    from moe.config import MoEConfig

    include = harness.local_task_configs(tmp_path / "tasks", real_data_dir)
    env = dict(os.environ, PYTHONPATH=ROOT, **OFFLINE)
    for kind, moe in (("dense", None), ("moe", MoEConfig(num_experts=4, expert_interval=2, topk=1,
                                                            eval_capacity_factor=1.0))):
        ckpt = save_gpt2_checkpoint(tmp_path / kind, moe)
        out = tmp_path / f"{kind}_harness"
        p = subprocess.run([sys.executable, "-m", "megatron.eval.harness", "--model", "megatron_moe",
                            "--model_args", f"load={ckpt},batch_size=16", "--tasks", "lambada_openai_local,piqa_local",
                            "--include_path", include, "--limit", "24", "--output_path", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        (path,) = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
        results = json.load(open(path))
        native_json = tmp_path / f"{kind}_native.json"
        p = subprocess.run([sys.executable, "tools/eval_zeroshot.py", "--load", ckpt, "--data-dir", real_data_dir,
                            "--limit", "24", "--micro-batch-size", "16", "--no-progress", "--output",
                            str(native_json)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr
        report = json.loads(native_json.read_text())
        _assert_same({(r["task"], r["metric"]): r["value"] for r in report["results"]}, _harness_values(results))
        recorded = results["config"]["megatron_moe"]["moe"]
        assert recorded == report["settings"]["moe"] == (None if moe is None else {
            "routing": "dropless", "drop_tokens": False, "eval_capacity_factor": None})


def test_model_args_win_over_the_harness_batch_size(tmp_path, tiny_corpus):
    """The harness's CLI passes model_args as a dict plus its own --batch_size (default 1): no clash, model_args
    win; a bare --batch_size is used; "auto" means 16."""
    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"])
    harness_settings = {"batch_size": "1", "max_batch_size": None, "device": None}
    lm = harness.MegatronMoELM.create_from_arg_obj({"load": ckpt, "batch_size": 4}, harness_settings)
    assert lm.batch_size == lm.scorer.micro_batch_size == 4
    assert harness.MegatronMoELM.create_from_arg_obj({"load": ckpt}, {"batch_size": "8"}).batch_size == 8
    assert harness.MegatronMoELM.create_from_arg_string(f"load={ckpt}", {"batch_size": "auto"}).batch_size == 16
    with pytest.raises(ValueError, match=r"batch_size \('x'\) must be a positive integer or auto"):
        harness.MegatronMoELM.create_from_arg_obj({"load": ckpt, "batch_size": "x"})
    # the harness's --device defaults to cuda: without a GPU that falls back to the CPU; model_args' device does not
    if not torch.cuda.is_available():
        assert harness.MegatronMoELM.create_from_arg_obj({"load": ckpt}, {"device": "cuda"}).device.type == "cpu"
        with pytest.raises(ValueError, match="device=cuda: this torch build has no CUDA device; use device=cpu"):
            harness.MegatronMoELM.create_from_arg_obj({"load": ckpt, "device": "cuda"})
