"""Zero-shot tasks and metrics: PIQA acc vs acc_norm by hand, LAMBADA splitting and perplexity, stderrs, registry."""
import json
import math

import pytest

from megatron.eval.metrics import mean_stderr, perplexity, perplexity_stderr
from megatron.eval.runner import evaluate_task
from megatron.eval.scorer import Answer, LoglikelihoodScorer, Request
from megatron.eval.tasks import TASK_REGISTRY, build_task
from tests.unit.test_eval_scorer import WINDOW, CharTokenizer, tiny_model


class StubScorer:
    """Answers from a table keyed by the continuation text (the tokenizer is CharTokenizer)."""

    def __init__(self, table):
        self.table = table
        self.seen = []

    def score(self, requests, progress=None):
        self.seen.extend(requests)
        tok = CharTokenizer()
        return [self.table[tok.detokenize(r.continuation)] for r in requests]


def test_piqa_acc_vs_acc_norm_by_hand():
    docs = [
        # A: acc picks sol2 (-7.2 > -9.0), acc_norm picks sol1 (-9.0/9 = -1.0 > -7.2/6 = -1.2); gold 0
        {"goal": "open jar", "choices": ["twist lid", "hit it"], "gold": 0},
        # B: acc picks sol1 (-6.0 > -8.8), acc_norm picks sol2 (-6.0/5 = -1.2 < -8.8/11 = -0.8); gold 1
        {"goal": "dry hair", "choices": ["towel", "wet blanket"], "gold": 1},
        # C: lengths exclude the leading space: -2.5/1 < -6.0/3 picks sol2 (gold); with the space counted
        #    (-2.5/2 > -6.0/4) it would pick sol1
        {"goal": "c", "choices": ["a", "bbb"], "gold": 1},
        # D: both metrics pick sol1 (-1.0 > -4.0; -1/3 > -4/2); gold 0
        {"goal": "d", "choices": ["yes", "no"], "gold": 0},
    ]
    table = {" twist lid": Answer(-9.0, False), " hit it": Answer(-7.2, False),
             " towel": Answer(-6.0, False), " wet blanket": Answer(-8.8, False),
             " a": Answer(-2.5, False), " bbb": Answer(-6.0, False),
             " yes": Answer(-1.0, False), " no": Answer(-4.0, False)}
    stub = StubScorer(table)
    rows, per_doc = evaluate_task(build_task("piqa"), docs, CharTokenizer(), stub)
    assert [d["acc"] for d in per_doc] == [0.0, 0.0, 0.0, 1.0]
    assert [d["acc_norm"] for d in per_doc] == [1.0, 1.0, 1.0, 1.0]
    by_metric = {r.metric: r for r in rows}
    assert by_metric["acc"].value == 0.25 and by_metric["acc_norm"].value == 1.0
    assert by_metric["acc"].stderr == pytest.approx(math.sqrt(0.25 * 0.75 / 3))  # sqrt(p(1-p)/(n-1))
    assert by_metric["acc_norm"].stderr == 0.0 and by_metric["acc"].num_examples == 4
    tok = CharTokenizer()
    assert tok.detokenize(stub.seen[0].context) == "Question: open jar\nAnswer:"


def test_lambada_split_matches_harness_and_perplexity_by_hand():
    task = build_task("lambada")
    # harness: context = " ".join(text.split(" ")[:-1]), target = " " + text.split(" ")[-1]
    for text in ["He said hello to Anna", "two  spaces  word", "no-space", 'quote "end."']:
        ((ctx, cont),) = task.requests({"text": text})
        parts = text.split(" ")
        assert (ctx, cont) == (" ".join(parts[:-1]), " " + parts[-1])
    docs = [{"text": "a b c"}, {"text": "d e f"}, {"text": "g h i"}]
    table = {" c": Answer(-1.0, True), " f": Answer(-3.0, False), " i": Answer(-2.0, True)}
    rows, _ = evaluate_task(task, docs, CharTokenizer(), StubScorer(table), bootstrap_iters=200)
    by_metric = {r.metric: r for r in rows}
    assert by_metric["acc"].value == pytest.approx(2 / 3)
    assert by_metric["ppl"].value == pytest.approx(math.exp(2.0))  # exp(mean NLL) = exp((1 + 3 + 2) / 3)
    assert by_metric["ppl"].stderr > 0 and by_metric["ppl"].higher_is_better is False


def test_lambada_last_token_variant_scores_only_the_final_token():
    task = build_task("lambada", last_token=True)
    (req,) = task.encode({"text": "ab cd"}, CharTokenizer())
    assert req == Request(tuple(map(ord, "ab c")), (ord("d"),))
    assert task.describe() == "last BPE token" and build_task("lambada").describe() == "whole last word"


def test_task_metrics_identical_at_any_micro_batch_size():
    model = tiny_model()
    lam_docs = [{"text": t} for t in ("the cat sat on the mat", "a b", "zzzz yyyy xxxx wwww vvvv uuuu tttt end")]
    piqa_docs = [{"goal": "g", "choices": ["x", "yy"], "gold": 1}, {"goal": "hh", "choices": ["abc", "d"], "gold": 0}]

    class SmallIdTokenizer(CharTokenizer):  # keep ids inside the tiny model's vocab
        def tokenize(self, text):
            return [ord(c) % 90 + 1 for c in text]

    tok = SmallIdTokenizer()
    results = []
    for mbs in (1, 7, 32):
        scorer = LoglikelihoodScorer(model, WINDOW, micro_batch_size=mbs)
        rows = evaluate_task(build_task("lambada"), lam_docs, tok, scorer)[0]
        rows += evaluate_task(build_task("piqa"), piqa_docs, tok, scorer)[0]
        results.append([(r.task, r.metric, r.value, r.stderr) for r in rows])
    assert results[0] == results[1] == results[2]


def test_metric_helpers():
    vals = [1.0, 0.0, 0.0, 1.0, 1.0]
    assert mean_stderr(vals) == pytest.approx(math.sqrt(0.6 * 0.4 / 4))
    lls = [-1.0, -2.5, -0.5, -4.0, -3.0, -2.0]
    assert perplexity(lls) == pytest.approx(math.exp(13.0 / 6))
    # the bootstrap agrees with the delta method ppl * sd(nll) / sqrt(n) to within resampling noise
    delta = perplexity(lls) * mean_stderr(lls)
    assert perplexity_stderr(lls, iters=4000, seed=0) == pytest.approx(delta, rel=0.25)
    assert perplexity_stderr(lls, iters=500, seed=3) == perplexity_stderr(lls, iters=500, seed=3)


def test_registry_and_unknown_task():
    assert {"lambada", "piqa", "boolq", "race", "triviaqa", "webqs"} <= set(TASK_REGISTRY)
    with pytest.raises(ValueError, match=r"--tasks: unknown task 'hellaswag'; known tasks: .*lambada.*piqa"):
        build_task("hellaswag")


def test_piqa_loader_checks_label_count(tmp_path):
    q, lab = tmp_path / "valid.jsonl", tmp_path / "valid-labels.lst"
    q.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n" + json.dumps(
        {"goal": "h", "sol1": "c", "sol2": "d"}) + "\n")
    lab.write_text("1\n0\n")
    docs = build_task("piqa").load_docs({"piqa-valid": q, "piqa-valid-labels": lab})
    assert docs == [{"goal": "g", "choices": ["a", "b"], "gold": 1}, {"goal": "h", "choices": ["c", "d"], "gold": 0}]
    lab.write_text("1\n")
    with pytest.raises(ValueError, match="has 2 questions but .* has 1 labels"):
        build_task("piqa").load_docs({"piqa-valid": q, "piqa-valid-labels": lab})
