"""Shared fixtures: a tiny SentencePiece tokenizer and indexed dataset built from synthetic English-like text."""
import json
import os
import random
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_SUBJ = "the cat|a dog|my friend|the old man|her sister|the teacher|a small bird|the king".split("|")
_VERB = "sees|likes|walks to|finds|reads|opens|paints|carries".split("|")
_OBJ = "the door|a red book|the garden|an apple|the river|a letter|the window|a green hat".split("|")


def synthetic_docs(n_docs: int, seed: int = 0):
    """Documents of grammatical sentences: learnable structure, so a tiny model's loss clearly falls."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)}." for _ in range(rng.randint(5, 30))]
        docs.append(" ".join(s.capitalize() for s in sents))
    return docs


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """{'jsonl', 'tokenizer_model', 'prefix', 'tokenizer'}: 300 docs, SentencePiece BPE vocab 128."""
    import sentencepiece as spm

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype
    from megatron.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("tiny_corpus")
    docs = synthetic_docs(300)
    jsonl = d / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(d / "sp"), vocab_size=128,
                                   model_type="bpe", num_threads=1, minloglevel=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(d / "sp.model"))
    prefix = str(d / "corpus_text_document")
    b = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=best_fitting_dtype(tok.vocab_size))
    for t in docs:
        b.add_item(np.array(tok.tokenize(t) + [tok.eod]))
        b.end_document()
    b.finalize(prefix + ".idx")
    return {"jsonl": str(jsonl), "tokenizer_model": str(d / "sp.model"), "prefix": prefix, "tokenizer": tok}


def tiny_train_argv(corpus, tmp_path, *extra):
    """Flags for a ~0.1M-parameter GPT on the tiny corpus (fast on 2 cores)."""
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
            "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", corpus["tokenizer_model"], "--data-path", corpus["prefix"], "--split", "90,10,0",
            "--data-cache-path", str(tmp_path / "cache"), "--num-workers", "0", "--log-interval", "5",
            "--eval-interval", "1000", "--eval-iters", "2", "--seed", "7", "--peak-flops", "1e11",
            "--make-vocab-size-divisible-by", "64", *extra]
