#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE by default) on the text of a jsonl corpus; writes PREFIX.model and PREFIX.vocab.

Example:
    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text --vocab-size 32000 --output-prefix tok/novels

The model keeps SentencePiece's default special ids (unk 0, bos 1, eos 2); ``SentencePieceTokenizer``
uses eos as the EOD token. ``byte_fallback`` is on, so any text round-trips.
"""

import argparse
import json
import os
import sys

from megatron.errors import ConfigError, UserError


class UsageError(ConfigError):
    """Bad flags or inputs: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def get_args(argv=None):
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="jsonl file, one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is used")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--max-docs", type=int, default=None, help="read only the first N documents")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines (paragraphs) SentencePiece samples for training; 0 = all")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--num-threads", type=int, default=2)
    args = p.parse_args(argv)
    if not os.path.isfile(args.input):
        raise UsageError(f"--input {args.input}: file does not exist")
    if args.vocab_size < 8:
        raise UsageError(f"--vocab-size ({args.vocab_size}) must be at least 8")
    return args


def iter_lines(path, keys, max_docs):
    """Non-empty lines of the selected keys' text (SentencePiece trains on lines, i.e. paragraphs here)."""
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f):
            if max_docs is not None and n >= max_docs:
                return
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UsageError(f"--input {path}: line {n + 1} is not json ({e.msg})") from None
            for key in keys:
                if key not in doc:
                    raise UsageError(f"--json-keys {key}: missing in {path} line {n + 1}")
                for line in str(doc[key] or "").split("\n"):
                    if line.strip():
                        yield line


def train(args):
    import sentencepiece as spm

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-prefix {args.output_prefix}: cannot create {out_dir} ({e.strerror})") from None
    lines = list(iter_lines(args.input, args.json_keys, args.max_docs))
    if not lines:
        raise UsageError(f"--input {args.input}: no text under --json-keys {' '.join(args.json_keys)}")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=args.output_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=True,
            byte_fallback=True,
            num_threads=args.num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. vocab too large for the text
        raise UsageError(f"--vocab-size {args.vocab_size}: SentencePiece refused ({str(e).strip().splitlines()[-1]})") from e
    print(f"wrote {args.output_prefix}.model and {args.output_prefix}.vocab ({len(lines)} lines)")
    return 0


def main(argv=None):
    try:
        return train(get_args(argv))
    except UserError as e:  # UsageError; a bug keeps its traceback
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
