"""Tokenizers: GPT-2 BPE ids against published values and a naive BPE, SentencePiece round trips, vocab padding."""

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

from megatron.data.data_files import DataFileError, default_data_dir, resolve
from megatron.tokenizer import GPT2BPETokenizer, SentencePieceTokenizer, build_tokenizer, pad_vocab_size
from megatron.tokenizer.tokenizer import GPT2_PRETOKENIZE_PATTERN, bytes_to_unicode

REPO = Path(__file__).resolve().parents[2]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpt2_files():
    try:
        # verify=False: hashing is covered by test_data_files; here only presence matters.
        return resolve("gpt2-vocab", verify=False), resolve("gpt2-merges", verify=False)
    except DataFileError as e:
        pytest.skip(f"GPT-2 BPE files not found under {default_data_dir()} ({e}); set DATA_DIR or run tools/download_data.py")


@pytest.fixture(scope="module")
def gpt2():
    vocab, merges = _gpt2_files()
    return GPT2BPETokenizer(str(vocab), str(merges))


@pytest.mark.parametrize(
    "text, ids",
    [
        # Published values: Hugging Face GPT2Tokenizer docs and the tiktoken README ("gpt2" encoding).
        ("Hello world", [15496, 995]),
        (" Hello world", [18435, 995]),
        (" Hello", [18435]),
        ("hello world", [31373, 995]),
        ("\n\n", [628]),
    ],
)
def test_gpt2_known_ids(gpt2, text, ids):
    assert gpt2.tokenize(text) == ids
    assert gpt2.detokenize(ids) == text


def test_gpt2_special_ids_and_sizes(gpt2):
    assert gpt2.eod == 50256
    assert gpt2.vocab["<|endoftext|>"] == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.inv_vocab[50256] == "<|endoftext|>"
    assert gpt2.name == "GPT2BPETokenizer"
    # Decision: special-token text is encoded as plain text (OpenAI encoder / Megatron behaviour);
    # EOD enters the data only via --append-eod.
    ids = gpt2.tokenize("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2.detokenize(ids) == "a<|endoftext|>b"
    assert gpt2.detokenize([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("text", ["😀 naïve café, 日本語!", "tabs\tand  spaces \n\n end ", "I'm sure you'll've", "", "1234567 3.14159"])
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.detokenize(gpt2.tokenize(text)) == text


def _naive_bpe_ids(vocab, ranks, text):
    """Reference encoder written from the algorithm's definition: repeatedly merge every occurrence of the
    lowest-ranked adjacent pair, scanning left to right; no cache, no translate table."""
    import regex

    byte_enc = bytes_to_unicode()
    out = []
    for word in regex.findall(GPT2_PRETOKENIZE_PATTERN, text):
        symbols = [byte_enc[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            ranked = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
            if not ranked:
                break
            pair = min(ranked)[1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        out.extend(vocab[s] for s in symbols)
    return out


def test_gpt2_matches_naive_bpe(gpt2):
    rng = random.Random(0)
    words = ["tokenization", " Megatron", "-style", " ÄÖÜ", " don't", " 2026", "\n", "  ", "!!?", " qwxz", " antidisestablishment"]
    text = "".join(rng.choice(words) for _ in range(300))
    try:  # real prose too, when the eval data is present
        with open(resolve("lambada", verify=False), encoding="utf-8") as f:
            text += "".join(json.loads(next(f))["text"] for _ in range(5))
    except DataFileError:
        pass
    assert gpt2.tokenize(text) == _naive_bpe_ids(gpt2.vocab, gpt2.bpe_ranks, text)
    assert gpt2.tokenize(text) == gpt2.tokenize(text)  # second pass is served from the BPE's word cache


def test_gpt2_rust_bpe_equals_python_reference_tool(gpt2, tmp_path, capsys):
    """The whole-corpus check's reference (tools/check_gpt2_bpe.py: the Python BPE GPT2BPETokenizer used before
    `tokenizers` backed it) agrees with the Rust BPE and the naive one on a small mixed text; the tool itself
    runs on a small jsonl (the whole-corpus figure is quoted in docs/design.md)."""
    tool = _load_tool("check_gpt2_bpe")
    ref = tool.ReferenceBPE(gpt2.encoder, gpt2.bpe_ranks)
    text = "Naïve café 😀, don't\tstop   2026!!\n\n Ünïcödé  qwxz antidisestablishmentarianism <|endoftext|>"
    assert ref.tokenize(text) == gpt2.tokenize(text) == _naive_bpe_ids(gpt2.vocab, gpt2.bpe_ranks, text)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (text, "Hello world", "")))
    vocab, merges = _gpt2_files()
    assert tool.main(["--input", str(corpus), "--vocab-file", str(vocab), "--merge-file", str(merges)]) == 0
    assert "3 documents" in capsys.readouterr().out
    tool.ReferenceBPE.tokenize = lambda self, t: [0] + gpt2.tokenize(t)  # a mismatch is reported, exit 1
    assert tool.main(["--input", str(corpus), "--vocab-file", str(vocab), "--merge-file", str(merges)]) == 1
    assert "MISMATCH: document 0: first difference at token 0" in capsys.readouterr().out


def test_build_tokenizer_gpt2_and_errors(tmp_path):
    vocab, merges = _gpt2_files()
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    assert tok.tokenize("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match=r"--vocab-file .*nope\.json"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "nope.json"), merge_file=str(merges))
    with pytest.raises(ValueError, match=r"--merge-file .*nope\.txt"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="--merge-file is required"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab))


def test_gpt2_files_checked_for_consistency(tmp_path):
    """A changed byte that leaves vocab.json/merges.txt parseable is still caught: ids must be 0..n-1 once each, and
    each merge's two symbols and their concatenation must be in the vocabulary (else encoding raises KeyError)."""
    from megatron.errors import DataError

    vocab, merges = _gpt2_files()
    enc = json.loads(Path(vocab).read_text(encoding="utf-8"))
    enc["the"], enc["thf"] = enc.pop("the"), -1  # a renamed token, and an id out of 0..n-1
    bad_vocab = tmp_path / "vocab.json"
    bad_vocab.write_text(json.dumps(enc), encoding="utf-8")
    with pytest.raises(DataError, match=rf"--vocab-file {bad_vocab}: token ids are not 0..50257 each once"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad_vocab), merge_file=str(merges))
    del enc["thf"]
    enc["thf"] = enc.pop("the")  # ids intact, but the merge "th e" now makes a token the vocabulary lacks
    bad_vocab.write_text(json.dumps(enc), encoding="utf-8")
    with pytest.raises(DataError, match=r"needs 'the', which --vocab-file .*vocab.json lacks"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad_vocab), merge_file=str(merges))
    lines = Path(merges).read_text(encoding="utf-8").split("\n")
    lines[5] = lines[5].replace(" ", "")  # one symbol on a line
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=rf"--merge-file {bad_merges}: line 6 has 1 symbols, expected 2"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(bad_merges))


def test_build_tokenizer_errors_without_data(tmp_path):
    with pytest.raises(ValueError, match=r"--tokenizer-model .*missing\.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="--tokenizer-type 'BertWordPiece'"):
        build_tokenizer("BertWordPiece")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"--tokenizer-model .*junk\.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(junk))


@pytest.mark.parametrize(
    "orig, divisible_by, tp, expected",
    [(50257, 128, 1, 50304), (50257, 128, 2, 50432), (50257, 128, 4, 50688), (50257, 128, 8, 51200),
     (50304, 128, 1, 50304), (32000, 128, 1, 32000), (100, 1, 1, 100), (7, 4, 3, 12)],
)
def test_pad_vocab_size(orig, divisible_by, tp, expected):
    assert pad_vocab_size(orig, divisible_by, tp) == expected


def test_pad_vocab_size_rejects_bad_multiple():
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by"):
        pad_vocab_size(100, 0)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 400-piece BPE model trained by tools/train_tokenizer.py on ~20 KB of generated text."""
    tmp = tmp_path_factory.mktemp("sp")
    rng = random.Random(1)
    words = "the a of and to in was he she it that his her had with for as at on by time little house said old".split()
    with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(40):
            paragraphs = [" ".join(rng.choice(words) for _ in range(40)).capitalize() + "." for _ in range(3)]
            f.write(json.dumps({"text": "\n".join(paragraphs), "title": "x"}) + "\n")
    tool = _load_tool("train_tokenizer")
    prefix = tmp / "tok"
    assert tool.main(["--input", str(tmp / "corpus.jsonl"), "--json-keys", "text", "--vocab-size", "400",
                      "--output-prefix", str(prefix)]) == 0
    return prefix


def test_sentencepiece_round_trip(sp_model):
    assert Path(f"{sp_model}.model").is_file() and Path(f"{sp_model}.vocab").is_file()
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=f"{sp_model}.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 400 and len(tok.vocab) == 400
    assert tok.eod == tok.sp.eos_id() == 2  # no <|endoftext|> piece, so EOS is the EOD
    for text in ["The old house said little.", "Unseen wörds and 😀 fall back to bytes."]:
        ids = tok.tokenize(text)
        assert all(0 <= i < 400 for i in ids)
        assert tok.detokenize(ids) == text
    assert len(tok.tokenize("the house")) < len("the house")  # merges were learned


def test_train_tokenizer_bad_input(tmp_path, capsys):
    tool = _load_tool("train_tokenizer")
    assert tool.main(["--input", str(tmp_path / "none.jsonl"), "--vocab-size", "100", "--output-prefix", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--input" in err and "none.jsonl" in err and len(err.splitlines()) == 1


def test_continuation_decoded_with_its_prompt(sp_model, gpt2):
    """The sample's first token keeps its space: prompt + continuation decode as one string (SentencePiece drops a
    sequence's first word-boundary space, so decoding the continuation alone gives "andshe")."""
    from megatron.tokenizer import decode_continuation

    sp = build_tokenizer("SentencePieceTokenizer", tokenizer_model=f"{sp_model}.model")
    for tok in (sp, gpt2):
        prompt, whole = "The old house and", "The old house and she said"
        ids, all_ids = tok.tokenize(prompt), tok.tokenize(whole)
        assert all_ids[:len(ids)] == ids  # the prompt's tokens are a prefix of the whole's
        new = all_ids[len(ids):]
        assert prompt + decode_continuation(tok, ids, new) == tok.detokenize(all_ids) == whole
    assert sp.detokenize(sp.tokenize(whole)[len(sp.tokenize(prompt)):]) == "she said"  # the bug, decoded alone
    # a character whose bytes straddle the boundary: the prompt's text is not a prefix; the continuation alone
    ids = gpt2.tokenize("😀")
    assert len(ids) > 1 and decode_continuation(gpt2, ids[:1], ids[1:]) == gpt2.detokenize(ids[1:])


def test_generate_prints_the_first_token_spaced(tmp_path, capsys, monkeypatch, tiny_corpus):
    """tools/generate.py end to end (the sampler replaced by fixed ids): prompt + " she ..." printed with its space."""
    from tests.unit.test_eval_cli import save_tiny_checkpoint

    tool = _load_tool("generate")
    tok = tiny_corpus["tokenizer"]
    prompt, whole = "The cat sees", "The cat sees the door."
    new = tok.tokenize(whole)[len(tok.tokenize(prompt)):]
    assert tok.detokenize(new) == "the door."  # what was printed before the fix: "The cat seesthe door."
    monkeypatch.setattr(tool, "generate", lambda *a, **k: list(new))
    ckpt = save_tiny_checkpoint(tmp_path / "ck", tiny_corpus["tokenizer_model"])
    assert tool.main(["--load", ckpt, "--prompt", prompt, "--no-progress"]) == 0
    assert capsys.readouterr().out == whole + "\n"


def _hf_gpt2_dir(directory, gpt2):
    """A Hugging Face GPT-2 tokenizer directory as transformers saves one: tokenizer.json (ByteLevel BPE,
    <|endoftext|> an added special token) and tokenizer_config.json naming the EOS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE(gpt2.encoder, sorted(gpt2.bpe_ranks, key=gpt2.bpe_ranks.get)))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    directory.mkdir(exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                               "tokenizer_class": "GPT2Tokenizer"}))
    return directory


def test_huggingface_tokenizer_gpt2_dir_equals_gpt2_bpe_and_transformers(tmp_path, gpt2):
    from megatron.tokenizer import HuggingFaceTokenizer

    d = _hf_gpt2_dir(tmp_path / "gpt2", gpt2)
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d))
    assert isinstance(tok, HuggingFaceTokenizer) and tok.name == "HuggingFaceTokenizer"
    assert tok.eod == 50256 and tok.vocab_size == 50257 and tok.vocab["Hello"] == 15496
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(d / "tokenizer.json")).eod == 50256
    text = "Hello world. Naïve café 😀\n\n  It's 2026, isn't it?"
    assert tok.tokenize(text) == gpt2.tokenize(text) and tok.detokenize(tok.tokenize(text)) == text
    assert 50256 not in tok.tokenize("a<|endoftext|>b")  # special-token text stays text, as for the others
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<|endoftext|>")
    assert hf(text, add_special_tokens=False).input_ids == tok.tokenize(text) and hf.eos_token_id == tok.eod


def test_huggingface_tokenizer_sentencepiece_style_eod_and_errors(tmp_path):
    """A Llama-style tokenizer.json (Metaspace, <s> </s> specials) trained here: EOD from tokenizer_config.json,
    no BOS added, one-line errors naming --tokenizer-model."""
    from megatron.errors import ConfigError, DataError
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    words = "the old house and she said little time was".split()
    rng = random.Random(0)
    tk.train_from_iterator([" ".join(rng.choice(words) for _ in range(30)) for _ in range(50)],
                           trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<eot>"],
                                               show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # Llama's BOS
    (tmp_path / "llama").mkdir()
    tk.save(str(tmp_path / "llama" / "tokenizer.json"))
    (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eot>"}}))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "llama"))
    assert tok.eod == tok.vocab["<eot>"] == 3  # the config's eos, not the first candidate </s>
    ids = tok.tokenize("the old house")
    assert tk.encode("the old house").ids == [1] + ids  # the file's post-processor adds BOS; encoding skips it
    assert tok.vocab["<s>"] not in ids and tok.detokenize(ids) == "the old house"
    (tmp_path / "llama" / "tokenizer_config.json").unlink()
    assert build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "llama")).eod == 2  # </s>
    with pytest.raises(ConfigError, match="--tokenizer-model is required for --tokenizer-type HuggingFaceTokenizer"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(DataError, match=r"--tokenizer-model .*empty: .*tokenizer.json does not exist"):
        (tmp_path / "empty").mkdir()
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "bad"))


def test_huggingface_tokenizer_flags_recorded_in_checkpoint_configs(tmp_path, gpt2):
    """pretrain_gpt.py's --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR: configured, the vocabulary
    padded, and recorded (absolute DIR) like the other types, so inference rebuilds the same tokenizer."""
    from megatron import checkpointing
    from megatron.arguments import configure

    d = _hf_gpt2_dir(tmp_path / "gpt2", gpt2)
    cfg, tok, _ = configure(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                             "--seq-length", "16", "--train-iters", "1", "--tokenizer-type", "HuggingFaceTokenizer",
                             "--tokenizer-model", os.path.relpath(d)], world_size=1)
    assert cfg.tokenizer.tokenizer_type == "HuggingFaceTokenizer" and cfg.model.padded_vocab_size == 50304
    recorded = checkpointing.configs_for_checkpoint(cfg)["tokenizer"]
    assert recorded["tokenizer_type"] == "HuggingFaceTokenizer" and recorded["tokenizer_model"] == str(d.resolve())
    rebuilt = build_tokenizer(recorded["tokenizer_type"], vocab_file=recorded["vocab_file"],
                              merge_file=recorded["merge_file"], tokenizer_model=recorded["tokenizer_model"])
    assert rebuilt.tokenize("Hello world") == tok.tokenize("Hello world") == [15496, 995]
