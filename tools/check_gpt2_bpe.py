"""Whole-corpus check that GPT2BPETokenizer (merges by the Rust `tokenizers` BPE) gives the ids of OpenAI's Python BPE.

    python tools/check_gpt2_bpe.py [--input CORPUS.jsonl] [--json-keys text] [--vocab-file V --merge-file M]

Defaults: the novel corpus and the GPT-2 files of the data directory (megatron.data.data_files; DATA_DIR).
The reference is OpenAI's ``encoder.py`` algorithm, the hand-written Python BPE GPT2BPETokenizer used before it
was backed by `tokenizers`: pre-tokenize with GPT2_PRETOKENIZE_PATTERN, map bytes to symbols, merge the
lowest-ranked adjacent pair everywhere until none is in the merge table (cached per word). Prints documents,
tokens, the time of each encoder and the first mismatching document; exit 1 on any mismatch.
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import regex  # noqa: E402

from megatron.tokenizer import GPT2BPETokenizer  # noqa: E402
from megatron.tokenizer.tokenizer import GPT2_PRETOKENIZE_PATTERN, bytes_to_unicode  # noqa: E402


class ReferenceBPE:
    """OpenAI's GPT-2 ``encoder.py`` BPE in Python, with a per-word cache (the reference, not for production)."""

    def __init__(self, encoder: Dict[str, int], bpe_ranks: Dict[tuple, int]):
        self.encoder, self.ranks = encoder, bpe_ranks
        self.byte_table = {b: c for b, c in bytes_to_unicode().items()}  # str.translate: chr(byte) -> symbol
        self.pattern = regex.compile(GPT2_PRETOKENIZE_PATTERN)
        self.cache: Dict[str, tuple] = {}

    def bpe(self, symbols: str) -> List[str]:
        word = list(symbols)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            first, second = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def tokenize(self, text: str) -> List[int]:
        ids: List[int] = []
        for word in self.pattern.findall(text):
            hit = self.cache.get(word)
            if hit is None:
                symbols = word.encode("utf-8").decode("latin-1").translate(self.byte_table)
                hit = self.cache[word] = tuple(self.encoder[s] for s in self.bpe(symbols))
            ids.extend(hit)
        return ids


def main(argv=None) -> int:
    from megatron.data.data_files import resolve

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=None, help="jsonl corpus (default: the registered novel corpus)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--max-documents", type=int, default=None)
    args = p.parse_args(argv)
    path = args.input or str(resolve("corpus"))
    tok = GPT2BPETokenizer(args.vocab_file or str(resolve("gpt2-vocab")),
                           args.merge_file or str(resolve("gpt2-merges")))
    ref = ReferenceBPE(tok.encoder, tok.bpe_ranks)
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)[k] or "" for line in f if line.strip() for k in args.json_keys]
    texts = texts[:args.max_documents] if args.max_documents else texts
    seconds = {"tokenizer": 0.0, "reference": 0.0}
    n_tokens, chars, bad = 0, sum(map(len, texts)), None
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        mine = tok.tokenize(text)
        t1 = time.perf_counter()
        theirs = ref.tokenize(text)
        seconds["tokenizer"] += t1 - t0
        seconds["reference"] += time.perf_counter() - t1
        n_tokens += len(theirs)
        if mine != theirs and bad is None:
            k = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            bad = (f"document {i}: first difference at token {k} (GPT2BPETokenizer {mine[k:k + 5]}, "
                   f"reference {theirs[k:k + 5]})")
    timing = ", ".join(f"{name} {t:.1f} s ({n_tokens / max(t, 1e-9):,.0f} tokens/s)"
                       for name, t in (("GPT2BPETokenizer", seconds["tokenizer"]), ("reference", seconds["reference"])))
    print(f"{path}: {len(texts)} documents, {chars:,} characters, {n_tokens:,} tokens; {timing}")
    print("ids equal on every document" if bad is None else f"MISMATCH: {bad}")
    return 0 if bad is None else 1


if __name__ == "__main__":
    sys.exit(main())
