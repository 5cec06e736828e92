"""lm-evaluation-harness's own `hf` model (transformers + the harness's HF tokenizer handling) against this
project's `megatron_moe` model on the same Hugging Face directory imported with tools/convert_hf.py: equal
LAMBADA (OpenAI) and PIQA accuracies and perplexities, for a dense Llama and a Qwen3-MoE (issue 26).

Both directories are random tiny models saved with save_pretrained, with the GPT-2 BPE (transformers'
GPT2TokenizerFast over /work/shared/data's gpt2 files, saved as tokenizer.json); the import records it as
HuggingFaceTokenizer. The window is 96 tokens (max_position_embeddings), shorter than some LAMBADA passages, so
the harness's left truncation of the context is exercised on both sides.
"""
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval not installed (pip install -r requirements-test.txt)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (requirements-test.txt)")

import megatron.eval.harness as harness  # noqa: E402,F401  (registers megatron_moe)
from tests.unit.test_convert_hf import cli  # noqa: E402
from tests.unit.test_eval_cli import real_data_dir  # noqa: E402,F401
from tests.unit.test_eval_harness import OFFLINE, _harness_values  # noqa: E402

LIMIT = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def _gpt2_tokenizer(d, bos=False):
    """The GPT-2 BPE as a tokenizers-library tokenizer.json (byte-level BPE over the shared vocab/merges files;
    ids equal GPT-2's) with a tokenizer_config.json naming <|endoftext|>: what AutoTokenizer and the import read."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from megatron.data.data_files import resolve

    t = Tokenizer(models.BPE.from_file(str(resolve("gpt2-vocab")), str(resolve("gpt2-merges"))))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    if bos:  # Llama's convention: a <s> the post-processor puts before every encoded text
        from tokenizers import processors

        t.add_special_tokens([AddedToken("<s>", special=True)])
        t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                         special_tokens=[("<s>", t.token_to_id("<s>"))])
    t.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "<|endoftext|>",
                                                         "bos_token": "<s>" if bos else "<|endoftext|>"}))
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _hf_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    tok = _gpt2_tokenizer(d, bos=name.endswith("-bos"))
    assert tok.encode("Question: hello there")[-4:] == [24361, 25, 23748, 612]  # GPT-2's ids
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                  max_position_embeddings=96, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=None, tie_word_embeddings=False)
    llama = lambda: transformers.LlamaConfig(intermediate_size=48, num_hidden_layers=2, **common)  # noqa: E731
    cfg = {"llama": llama, "llama-bos": llama,
           "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
               intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, head_dim=8, num_experts=4,
               num_experts_per_tok=2, norm_topk_prob=True, **common)}[name]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # off the init (std 0.02 gives near-uniform predictions and ties between choices)
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(d)
    return str(d)


# ~20-30 s each on 2 shared cores: the BOS case (the one that differed) runs by default, the others in `make test-all`
@pytest.mark.parametrize("name", ["llama-bos", pytest.param("llama", marks=pytest.mark.slow),
                                  pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_harness_hf_model_equals_megatron_moe_on_the_import(tmp_path, real_data_dir, name):  # noqa: F811
    from lm_eval.tasks import TaskManager

    d = _hf_dir(tmp_path, name)
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0
    include = harness.local_task_configs(tmp_path / "tasks", real_data_dir)
    tasks = ["lambada_openai_local", "piqa_local"]

    def run(model, args):
        results = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=tasks, limit=LIMIT, bootstrap_iters=0, device="cpu", log_samples=True,
            task_manager=TaskManager(include_path=include, include_defaults=False))
        per_request = {(t, s["doc_id"], i): r for t in tasks for s in results["samples"][t]
                       for i, r in enumerate(s["filtered_resps"])}
        return _harness_values(results), per_request

    theirs, their_requests = run("hf", f"pretrained={d},dtype=float32,batch_size=8")
    ours, our_requests = run("megatron_moe", f"load={tmp_path / 'ck'},batch_size=8,device=cpu")
    # every request: the same log-likelihood within 1e-4 (a sum of 1-30 token log-probs, each equal to ~1e-5 as the
    # logits are, tests/unit/test_hf_families.py) and the same is-greedy flag (LAMBADA's accuracy)
    assert our_requests.keys() == their_requests.keys() and len(our_requests) == LIMIT * 3
    for key, (ll, greedy) in their_requests.items():
        assert our_requests[key][0] == pytest.approx(float(ll), abs=1e-4), key
        assert bool(our_requests[key][1]) == bool(greedy), key
    # so the task metrics: accuracies identical, perplexity (exp of a mean) to 1e-4 relative
    for key in (("lambada", "acc"), ("piqa", "acc"), ("piqa", "acc_norm")):
        assert ours[key] == theirs[key], (key, ours, theirs)
    assert ours[("lambada", "ppl")] == pytest.approx(theirs[("lambada", "ppl")], rel=1e-4), (ours, theirs)


@pytest.mark.parametrize("name", ["llama", pytest.param("llama-bos", marks=pytest.mark.slow)])
def test_each_request_type_equals_the_hf_model(tmp_path, name):
    """The three request types one by one, the edge cases included: an empty context (the prefix token: BOS when
    the tokenizer has one, else EOS), a rolling log-likelihood longer than the window (prefix token, BOS from the
    post-processor in front of the text), greedy generate_until."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    d = _hf_dir(tmp_path, name)
    assert cli.main(["import", "--hf-dir", d, "--save", str(tmp_path / "ck")]) == 0
    theirs = HFLM(pretrained=d, dtype="float32", batch_size=4, device="cpu")
    ours = harness.MegatronMoELM(load=str(tmp_path / "ck"), batch_size=4, device="cpu")
    text = " ".join(["the quick brown fox jumps over the lazy dog and"] * 30)  # ~300 tokens > the 96 window
    ll = [Instance(request_type="loglikelihood", doc={}, idx=0, arguments=(c, x))
          for c, x in (("", " hello world"), ("Question: why?", " Because."), ("A", "<|endoftext|> B"))]
    for a, b in zip(ours.loglikelihood(ll, disable_tqdm=True), theirs.loglikelihood(ll, disable_tqdm=True)):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]  # fp32 sums of ~1e-5 token differences
    roll = [Instance(request_type="loglikelihood_rolling", doc={}, idx=0, arguments=(text,))]
    (a,), (b,) = ours.loglikelihood_rolling(roll, disable_tqdm=True), theirs.loglikelihood_rolling(roll, True)
    assert a == pytest.approx(b, rel=1e-5)
    gen = [Instance(request_type="generate_until", doc={}, idx=0,
                    arguments=("The quick brown", {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}))]
    assert ours.generate_until(gen, disable_tqdm=True) == theirs.generate_until(gen, disable_tqdm=True)
