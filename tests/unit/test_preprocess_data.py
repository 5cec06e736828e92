"""tools/preprocess_data.py end to end on a tiny jsonl, against tokenizing in-process, plus its error handling."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.data.data_files import DataFileError, resolve
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.tokenizer import build_tokenizer
from tests.inprocess import run_cli

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "preprocess_data.py"

DOCS = [
    {"text": "Hello world. It was a dark and stormy night.", "title": "One"},
    {"text": "", "title": "Empty text is skipped"},
    {"text": "Naïve café 😀\n\nSecond paragraph.", "title": "Unicode"},
] + [{"text": f"Document number {i}: " + "word " * (i % 7), "title": f"T{i}"} for i in range(20)]


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["preprocess_data"] = module  # worker processes unpickle Encoder.encode by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpt2_flags():
    try:
        vocab, merges = resolve("gpt2-vocab", verify=False), resolve("gpt2-merges", verify=False)
    except DataFileError as e:
        pytest.skip(f"GPT-2 BPE files not available ({e})")
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file", str(merges)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    return path


def test_end_to_end_matches_in_process_tokenization(tmp_path, jsonl, gpt2_flags, capsys):
    out = tmp_path / "out" / "tiny"
    rc = _load_tool().main(["--input", str(jsonl), "--json-keys", "text", "title", "--output-prefix", str(out),
                            "--append-eod", "--workers", "2"] + gpt2_flags)
    assert rc == 0
    assert "docs/s" in capsys.readouterr().out
    tok = build_tokenizer(*gpt2_flags[1::2])
    for key in ("text", "title"):
        expected = [tok.tokenize(d[key]) + [tok.eod] for d in DOCS if d[key]]
        ds = MMapIndexedDataset(f"{out}_{key}_document")
        assert ds.dtype is np.uint16
        assert [ds[i].tolist() for i in range(len(ds))] == expected
        assert ds.doc_idx.tolist() == list(range(len(expected) + 1))
    assert sorted(os.listdir(out.parent)) == sorted(f"tiny_{k}_document.{s}" for k in ("text", "title") for s in ("bin", "idx"))


def test_max_documents_and_no_eod(tmp_path, jsonl, gpt2_flags):
    out = tmp_path / "m"
    assert _load_tool().main(["--input", str(jsonl), "--output-prefix", str(out), "--max-documents", "3", "--workers", "1"] + gpt2_flags) == 0
    ds = MMapIndexedDataset(f"{out}_text_document")
    assert len(ds) == 2 and ds[0].tolist()[:2] == [15496, 995]  # "Hello world", no EOD appended


def test_failure_mid_run_leaves_nothing(tmp_path, jsonl, gpt2_flags, monkeypatch):
    tool = _load_tool()
    calls = []
    real_encode = tool.Encoder.encode

    def exploding_encode(doc):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated crash")
        return real_encode(doc)

    monkeypatch.setattr(tool.Encoder, "encode", staticmethod(exploding_encode))
    out_dir = tmp_path / "o"
    with pytest.raises(RuntimeError, match="simulated crash"):
        tool.main(["--input", str(jsonl), "--output-prefix", str(out_dir / "x"), "--workers", "1"] + gpt2_flags)
    assert os.listdir(out_dir) == []


def _run_cli(args):
    """tools/preprocess_data.py's main(argv) in this process (its exit-code smoke test is in tests/cli)."""
    return run_cli("tools/preprocess_data.py", args)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--input", "{tmp}/missing.jsonl", "--output-prefix", "{tmp}/o", "--tokenizer-type", "GPT2BPETokenizer"], "--input {tmp}/missing.jsonl"),
        (["--input", "{jsonl}", "--output-prefix", "{tmp}/o", "--tokenizer-type", "GPT2BPETokenizer",
          "--vocab-file", "{tmp}/v.json", "--merge-file", "{tmp}/m.txt"], "--vocab-file {tmp}/v.json"),
        (["--input", "{jsonl}", "--output-prefix", "{tmp}/o", "--tokenizer-type", "SentencePieceTokenizer"], "--tokenizer-model is required"),
        (["--input", "{jsonl}", "--tokenizer-type", "GPT2BPETokenizer"], "--output-prefix"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, jsonl, args, needle):
    fill = lambda s: s.format(tmp=tmp_path, jsonl=jsonl)  # noqa: E731
    proc = _run_cli([fill(a) for a in args])
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and fill(needle) in err[0], proc.stderr
    assert not list(tmp_path.glob("o*"))


def test_unknown_json_key_exit_2(tmp_path, jsonl, gpt2_flags, capsys):
    rc = _load_tool().main(["--input", str(jsonl), "--json-keys", "body", "--output-prefix", str(tmp_path / "o")] + gpt2_flags)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--json-keys body" in err[0] and "columns: text, title" in err[0]
    assert not list(tmp_path.glob("o*"))


def test_huggingface_tokenizer_dir(tmp_path, jsonl, gpt2_flags, capsys):
    """--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR (a GPT-2 tokenizer.json): the GPT-2 ids; a
    directory without tokenizer.json exits 2 with one line naming --tokenizer-model."""
    from tests.unit.test_tokenizer import _hf_gpt2_dir

    gpt2 = build_tokenizer(*gpt2_flags[1::2])
    hf_dir = _hf_gpt2_dir(tmp_path / "hf", gpt2)
    out = tmp_path / "h"
    tool = _load_tool()
    assert tool.main(["--input", str(jsonl), "--output-prefix", str(out), "--append-eod", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir)]) == 0
    ds = MMapIndexedDataset(f"{out}_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [gpt2.tokenize(d["text"]) + [gpt2.eod] for d in DOCS if d["text"]]
    capsys.readouterr()
    assert tool.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--tokenizer-model {tmp_path}" in err[0] and "tokenizer.json" in err[0]
