#!/usr/bin/env python
"""Tokenize a jsonl corpus into Megatron mmap indexed datasets (``{prefix}_{key}_document.bin/.idx``).

Example:
    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --output-prefix data/novels \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --append-eod --workers 2
    (or --tokenizer-type SentencePieceTokenizer --tokenizer-model sp.model, or --tokenizer-type
    HuggingFaceTokenizer --tokenizer-model DIR with DIR/tokenizer.json, read offline)

Each json key gets its own dataset with one sequence per document; documents whose text tokenizes to
nothing are skipped (as in Megatron-LM). Outputs are written under temporary names and renamed at the
end, so an interrupted run leaves no half-written dataset.
"""

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time

# The jsonl is read locally; never let `datasets` try the Hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype
from megatron.errors import ConfigError, UserError
from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.tokenizer import TOKENIZER_TYPES

logger = logging.getLogger("preprocess_data")


class UsageError(ConfigError):
    """Bad flags or inputs: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(message)


def get_args(argv=None):
    p = _Parser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="jsonl file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one output dataset each")
    g.add_argument("--max-documents", type=int, default=None, help="only the first N documents (quick runs)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file; HuggingFaceTokenizer: a directory holding tokenizer.json")
    g.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=100,
                   help="documents between progress lines (progress bar updates on a terminal)")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise UsageError(f"--workers ({args.workers}) must be >= 1")
    if args.log_interval < 1:
        raise UsageError(f"--log-interval ({args.log_interval}) must be >= 1")
    if args.max_documents is not None and args.max_documents < 1:
        raise UsageError(f"--max-documents ({args.max_documents}) must be >= 1")
    if not os.path.isfile(args.input):
        raise UsageError(f"--input {args.input}: file does not exist")
    return args


def _tokenizer_kwargs(args):
    return dict(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                merge_file=args.merge_file, tokenizer_model=args.tokenizer_model)


class Encoder:
    """Per-process tokenizer state; ``encode`` maps one document to ``{key: ids}``."""

    tokenizer = None
    keys = ()
    append_eod = False
    dtype = np.int32

    @classmethod
    def initialize(cls, tokenizer_kwargs, keys, append_eod):
        cls.tokenizer = build_tokenizer(**tokenizer_kwargs)
        cls.keys = tuple(keys)
        cls.append_eod = append_eod
        cls.dtype = best_fitting_dtype(cls.tokenizer.vocab_size)

    @classmethod
    def encode(cls, doc):
        out = {}
        chars = 0
        for key in cls.keys:
            text = doc[key]
            chars += len(text)
            ids = cls.tokenizer.tokenize(text)
            if ids and cls.append_eod:
                ids.append(cls.tokenizer.eod)
            out[key] = np.asarray(ids, dtype=cls.dtype)
        return out, chars


def load_documents(args, cache_dir):
    """The jsonl as a HF dataset restricted to --json-keys (checked), first --max-documents rows."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()  # keep bad-input reports to our one line
    try:
        ds = datasets.load_dataset("json", data_files=args.input, split="train", cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types for malformed json
        raise UsageError(f"--input {args.input}: cannot read as jsonl ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    missing = [k for k in args.json_keys if k not in ds.column_names]
    if missing:
        raise UsageError(f"--json-keys {' '.join(missing)}: not in {args.input} (columns: {', '.join(ds.column_names)})")
    for key in args.json_keys:
        if ds.features[key].dtype != "string":
            raise UsageError(f"--json-keys {key}: values in {args.input} are {ds.features[key].dtype}, not text")
    ds = ds.select_columns(args.json_keys)
    if args.log_interval < 1:
        raise UsageError(f"--log-interval ({args.log_interval}) must be >= 1")
    if args.max_documents is not None:
        ds = ds.select(range(min(args.max_documents, len(ds))))
    return ds


def _documents(ds, keys):
    for row in ds:
        yield {k: (row[k] or "") for k in keys}  # a null value counts as empty text


def run(args):
    tok_kwargs = _tokenizer_kwargs(args)
    Encoder.initialize(tok_kwargs, args.json_keys, args.append_eod)  # checks the tokenizer files up front
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-prefix {args.output_prefix}: cannot create {out_dir} ({e.strerror})") from None
    final = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in final.items()}
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="preprocess_hf_cache_") as hf_cache:
        ds = load_documents(args, hf_cache)
        n_docs = len(ds)
        builders = {k: MMapIndexedDatasetBuilder(tmp[k] + ".bin", dtype=Encoder.dtype) for k in args.json_keys}
        pool = None
        try:
            start = time.time()
            if args.workers > 1:
                ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                pool = ctx.Pool(args.workers, initializer=Encoder.initialize,
                                initargs=(tok_kwargs, args.json_keys, args.append_eod))
                chunksize = max(1, min(64, n_docs // (args.workers * 16)))
                encoded = pool.imap(Encoder.encode, _documents(ds, args.json_keys), chunksize)
            else:
                encoded = map(Encoder.encode, _documents(ds, args.json_keys))
            n_tokens = n_chars = 0
            skipped = {k: 0 for k in args.json_keys}
            with tqdm(total=n_docs, unit="doc", miniters=args.log_interval, file=sys.stderr,
                      disable=None, desc="tokenizing") as bar:
                for n_done, (doc, chars) in enumerate(encoded, start=1):
                    n_chars += chars
                    for key, ids in doc.items():
                        if ids.size == 0:
                            skipped[key] += 1
                            continue
                        builders[key].add_item(ids)
                        builders[key].end_document()
                        n_tokens += ids.size
                    bar.update(1)
                    if bar.disable and n_done % args.log_interval == 0:  # no terminal: Megatron-style lines
                        dt = max(time.time() - start, 1e-9)
                        print(f"processed {n_done}/{n_docs} documents ({n_done / dt:.1f} docs/s, "
                              f"{n_chars / dt / 1e6:.2f} M chars/s)", file=sys.stderr, flush=True)
            for k, b in builders.items():
                b.finalize(tmp[k] + ".idx")
            for k in args.json_keys:
                os.replace(tmp[k] + ".bin", final[k] + ".bin")
                os.replace(tmp[k] + ".idx", final[k] + ".idx")  # the index last: its presence means complete
            elapsed = max(time.time() - start, 1e-9)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            for k in args.json_keys:
                for suffix in (".bin", ".idx"):
                    if os.path.exists(tmp[k] + suffix):
                        os.remove(tmp[k] + suffix)
    for k in args.json_keys:
        if skipped[k]:
            print(f"{k}: skipped {skipped[k]} empty documents", file=sys.stderr)
        print(f"wrote {final[k]}.bin/.idx")
    print(f"{n_docs} documents, {n_tokens} tokens, {n_chars} characters in {elapsed:.1f} s: "
          f"{n_docs / elapsed:.1f} docs/s, {n_tokens / elapsed:,.0f} tokens/s, {n_chars / elapsed / 1e6:.2f} M chars/s")
    return 0


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "preprocess_data.py"
    try:
        return run(get_args(argv))
    except UserError as e:  # UsageError, or a tokenizer file the flags name; a bug keeps its traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
