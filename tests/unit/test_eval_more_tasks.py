"""BoolQ, RACE-high, TriviaQA and WebQs: fixtures written here, scored as lm-evaluation-harness scores them.

Expected numbers are worked out by hand next to each fixture; where lm_eval is installed, the prompt builders are
also compared with the harness's own task code (lm_eval/tasks/race/preprocess_race.py, webqs/utils.py).
"""
import json

import pytest

from megatron.data.data_files import DataFileError
from megatron.errors import DataError
from megatron.eval.runner import evaluate_task, verify_data
from megatron.eval.scorer import Answer
from megatron.eval.tasks import build_task
from tests.unit.test_eval_scorer import CharTokenizer


class PairScorer:
    """Answers from a table keyed by (context, continuation) text (CharTokenizer: one id per character)."""

    def __init__(self, table):
        self.table = table

    def score(self, requests, progress=None):
        tok = CharTokenizer()
        return [self.table[(tok.detokenize(r.context), tok.detokenize(r.continuation))] for r in requests]


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_boolq_acc_by_hand(tmp_path):
    _write_parquet(tmp_path / "boolq" / "validation.parquet", [
        {"question": "is the sky blue", "passage": "Sky.", "idx": 0, "label": 1},
        {"question": "is fire cold", "passage": "Fire.", "idx": 1, "label": 0},
        {"question": "is it a tie", "passage": "Tie.", "idx": 2, "label": 1},
    ])
    task = build_task("boolq")
    docs = task.load_docs(verify_data([task], tmp_path)["boolq"])
    ctx = [f"{p}\nQuestion: {q}?\nAnswer:" for p, q in (("Sky.", "is the sky blue"), ("Fire.", "is fire cold"),
                                                         ("Tie.", "is it a tie"))]
    table = {(ctx[0], " yes"): Answer(-1.0, True), (ctx[0], " no"): Answer(-2.0, False),  # yes, gold yes: 1
             (ctx[1], " yes"): Answer(-0.5, True), (ctx[1], " no"): Answer(-3.0, False),  # yes, gold no: 0
             (ctx[2], " yes"): Answer(-1.0, False), (ctx[2], " no"): Answer(-1.0, False)}  # tie -> "no": 0
    rows, per_doc = evaluate_task(task, docs, CharTokenizer(), PairScorer(table))
    assert [d["acc"] for d in per_doc] == [1.0, 0.0, 0.0]
    assert rows[0].metric == "acc" and rows[0].value == pytest.approx(1 / 3)


RACE_DOC = {"article": "Tom has a cat.", "problems": repr([
    {"question": "Tom has a  _  .", "options": ["dog", "cat", "cow", "fox"], "answer": "B"},
    {"question": "Who has a cat?", "options": ["Ann", "Bob", "Tom", "Sue"], "answer": "C"},
    {"question": "What colour is it?", "options": ["red", "black", "white", "grey"], "answer": "D"},
])}


def test_race_context_and_acc_by_hand(tmp_path):
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "race_high_test.jsonl").write_text(json.dumps(RACE_DOC) + "\n")
    task = build_task("race")
    (doc,) = task.load_docs(verify_data([task], tmp_path)["race"])
    # the cloze question gets its blank filled ("  _  ." minus its last 5 characters + answer), the plain one a
    # Question/Answer pair, then the last question alone; continuations are its options after a space
    ctx = "Article: Tom has a cat.\n\nTom has a cat\nQuestion: Who has a cat?\nAnswer: Tom\nWhat colour is it?"
    reqs = task.requests(doc)
    assert reqs == [(ctx, " red"), (ctx, " black"), (ctx, " white"), (ctx, " grey")]
    lls = {" red": -4.0, " black": -3.0, " white": -5.0, " grey": -3.5}
    table = {(ctx, c): Answer(v, False) for c, v in lls.items()}
    _, per_doc = evaluate_task(task, [doc], CharTokenizer(), PairScorer(table))
    assert per_doc == [{"acc": 0.0}]  # argmax is " black" (index 1), the answer is D (index 3)
    table[(ctx, " grey")] = Answer(-1.0, False)
    assert evaluate_task(task, [doc], CharTokenizer(), PairScorer(table))[1] == [{"acc": 1.0}]
    race = pytest.importorskip("lm_eval.tasks.race.preprocess_race")  # the harness's own prompt code
    assert race.doc_to_text(RACE_DOC) == ctx and race.doc_to_target(RACE_DOC) == 3
    assert race.doc_to_choice(RACE_DOC) == ["red", "black", "white", "grey"]


def test_race_bad_record_is_one_line(tmp_path):
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "race_high_test.jsonl").write_text(json.dumps({"article": "a", "problems": "[{"}) + "\n")
    task = build_task("race")
    with pytest.raises(DataError, match=r"race_high_test.jsonl: record 1: `problems` is not a list"):
        task.load_docs(verify_data([task], tmp_path)["race"])


def test_webqs_exact_match_any_alias_greedy(tmp_path):
    _write_parquet(tmp_path / "webqs" / "test.parquet", [
        {"url": "u", "question": "where is paris?", "answers": ["France", "Fr", "Europe"]},
        {"url": "u", "question": "who?", "answers": ["Bob"]},
    ])
    task = build_task("webqs")
    docs = task.load_docs(verify_data([task], tmp_path)["webqs"])
    # sorted ["Europe", "Fr", "France"]; "France" starts with the kept "Fr", so it is dropped
    assert [c for _, c in task.requests(docs[0])] == [" Europe", " Fr"]
    c0, c1 = "Question: where is paris?\nAnswer:", "Question: who?\nAnswer:"
    table = {(c0, " Europe"): Answer(-9.0, False), (c0, " Fr"): Answer(-1.0, True),  # one alias greedy: 1
             (c1, " Bob"): Answer(-0.1, False)}  # the only alias is not greedy: 0
    rows, per_doc = evaluate_task(task, docs, CharTokenizer(), PairScorer(table))
    assert [d["exact_match"] for d in per_doc] == [1.0, 0.0] and rows[0].value == 0.5
    utils = pytest.importorskip("lm_eval.tasks.webqs.utils")
    assert utils.doc_to_choice({"answers": ["France", "Fr", "Europe"]}) == ["Europe", "Fr"]


def test_triviaqa_normalised_exact_match_by_hand(tmp_path):
    _write_parquet(tmp_path / "triviaqa" / "rc.nocontext-validation.parquet", [
        {"question": "Which band sang Help", "question_id": "a",
         "answer": {"aliases": ["The Beatles", "Beatles"], "value": "The Beatles"}},
        {"question": "Largest country", "question_id": "b", "answer": {"aliases": ["U.S.S.R."], "value": "USSR"}},
        {"question": "Capital of France", "question_id": "c", "answer": {"aliases": ["Paris"], "value": "Paris"}},
    ])
    task = build_task("triviaqa")
    docs = task.load_docs(verify_data([task], tmp_path)["triviaqa"])
    generated = {"Question: Which band sang Help?\nAnswer:": " the beatles ",  # case + whitespace: 1
                 "Question: Largest country?\nAnswer:": " USSR",  # punctuation removed from the alias: 1
                 "Question: Capital of France?\nAnswer:": " Lyon"}  # 0
    seen = []

    def generator(prompt, until, max_gen_toks):
        seen.append((until, max_gen_toks))
        return generated[prompt]

    rows, per_doc = evaluate_task(task, docs, CharTokenizer(), None, generator=generator)
    assert [d["exact_match"] for d in per_doc] == [1.0, 1.0, 0.0] and rows[0].value == pytest.approx(2 / 3)
    assert seen[0] == (("\n", ".", ","), 256)  # the harness yaml's stop rules, its HF model's default budget


@pytest.mark.parametrize("name,relpath", [("boolq", "boolq/validation.parquet"),
                                          ("race", "race/race_high_test.jsonl"),
                                          ("triviaqa", "triviaqa/rc.nocontext-validation.parquet"),
                                          ("webqs", "webqs/test.parquet")])
def test_missing_file_is_one_line_pointing_at_the_download_tool(tmp_path, name, relpath):
    with pytest.raises(DataFileError) as info:
        verify_data([build_task(name)], tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and f"{relpath}: missing (sha256 not recorded)" in msg
    assert "tools/download_data.py" in msg


def test_cli_runs_the_four_tasks_on_a_checkpoint(tmp_path, capsys, tiny_corpus):
    """The user's route: tools/eval_zeroshot.py --tasks boolq,race,triviaqa,webqs on local fixtures. TriviaQA's
    first question lists the model's own greedy answer (a brute-force loop without KV cache, cut at the first stop
    sequence) among its aliases, so its exact match is 1 and the second question's (alias "zzz") is 0."""
    import torch

    from megatron.inference import load_model_for_inference
    from tests.unit.test_eval_cli import cli, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"], window=48)
    model, tok, _ = load_model_for_inference(ckpt)
    prompt = "Question: The cat sees?\nAnswer:"
    ids, out = tok.tokenize(prompt), []
    with torch.no_grad():
        for _ in range(48 // 2):  # the task's 256-token budget, cut to half of this model's 48-token window
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eod:
                break
            out.append(nxt)
    text = tok.detokenize(out)
    for stop in ("\n", ".", ","):
        text = text.split(stop)[0]
    data = tmp_path / "data"
    _write_parquet(data / "triviaqa" / "rc.nocontext-validation.parquet", [
        {"question": "The cat sees", "answer": {"aliases": ["nothing", text.strip().upper()]}},
        {"question": "A dog finds", "answer": {"aliases": ["zzz"]}}])
    _write_parquet(data / "boolq" / "validation.parquet", [{"question": "is it", "passage": "It is.", "label": 1}])
    _write_parquet(data / "webqs" / "test.parquet", [{"question": "who?", "answers": ["the king", "a dog"]}])
    (data / "race").mkdir()
    (data / "race" / "race_high_test.jsonl").write_text(json.dumps(RACE_DOC) + "\n")
    out_json = tmp_path / "r.json"
    rc = cli.main(["--load", ckpt, "--data-dir", str(data), "--tasks", "boolq,race,triviaqa,webqs",
                   "--no-progress", "--output", str(out_json)])
    assert rc == 0, capsys.readouterr().err
    got = {(r["task"], r["metric"]): r for r in json.loads(out_json.read_text())["results"]}
    assert set(got) == {("boolq", "acc"), ("race", "acc"), ("triviaqa", "exact_match"), ("webqs", "exact_match")}
    assert got[("triviaqa", "exact_match")]["value"] == 0.5 and got[("triviaqa", "exact_match")]["num_examples"] == 2
    assert got[("race", "acc")]["num_examples"] == 1 and got[("boolq", "acc")]["value"] in (0.0, 1.0)
