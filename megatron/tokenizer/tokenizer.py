"""The tokenizer interface, its GPT-2 BPE, SentencePiece and Hugging Face implementations, and `build_tokenizer`."""

import json
import logging
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from itertools import chain
from typing import Dict, List, Optional, Sequence

import regex

from megatron.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# OpenAI's GPT-2 pre-tokenizer: contractions, letter runs, number runs, other-symbol runs, whitespace.
GPT2_PRETOKENIZE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOD_TOKEN = "<|endoftext|>"
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer")


class AbstractTokenizer(ABC):
    """What the data pipeline, training and eval code need from a tokenizer."""

    def __init__(self, name: str):
        self.name = name

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, before padding for the embedding table."""

    @property
    @abstractmethod
    def vocab(self) -> Dict[str, int]:
        """Token string -> id."""

    @property
    @abstractmethod
    def inv_vocab(self) -> Dict[int, str]:
        """Id -> token string."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id appended after every document (``--append-eod``)."""

    @abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Encode text into ids; special-token strings in ``text`` are encoded as plain text."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids back into text."""


@lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + n) so that no
    BPE symbol is whitespace or a control character.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GPT2BPETokenizer(AbstractTokenizer):
    """Byte-level BPE with OpenAI's GPT-2 ids; the merges are computed by the Rust `tokenizers` library.

    Args:
        vocab_file: ``encoder.json`` / ``gpt2-vocab.json`` (token string -> id).
        merge_file: ``vocab.bpe`` / ``gpt2-merges.txt`` (``#version`` line, then one merge per line,
            highest priority first).

    Encoding: OpenAI's pre-tokenizer pattern (Python `regex`, the reference definition), then each pre-token's
    ids from a word cache; a word not seen yet is mapped to byte symbols and merged by a `tokenizers` BPE model
    built from the same files. Its ids equal the hand-written Python BPE this class used before (OpenAI's
    ``encoder.py``, now the reference in tools/check_gpt2_bpe.py) on the whole novel corpus.

    Why not the whole `tokenizers` pipeline (its ByteLevel pre-tokenizer too): on the novels it encodes ~5x
    slower than the cached path (about 100k against 550k tokens/s on one novel, same process): its per-piece
    bookkeeping (offsets, alignments) costs more than a dictionary hit, and novels reuse a small set of words.
    ``<|endoftext|>`` inside text is encoded as ordinary characters (OpenAI's encoder and Megatron-LM do the same).
    """

    _MAX_CACHE_ENTRIES = 2_000_000  # a safety valve for adversarial inputs; typical corpora stay far below

    def __init__(self, vocab_file: str, merge_file: str):
        super().__init__("GPT2BPETokenizer")
        from tokenizers import models

        self.encoder: Dict[str, int] = _read_gpt2_vocab(vocab_file)
        self.decoder: Dict[int, str] = {v: k for k, v in self.encoder.items()}
        merges = _read_gpt2_merges(merge_file, self.encoder, vocab_file)
        self.bpe_ranks: Dict[tuple, int] = dict(zip(merges, range(len(merges))))
        self.byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
        if GPT2_EOD_TOKEN not in self.encoder:
            raise DataError(f"--vocab-file {vocab_file} has no {GPT2_EOD_TOKEN} entry; is it a GPT-2 vocab?")
        self._eod = self.encoder[GPT2_EOD_TOKEN]
        self._findall = regex.compile(GPT2_PRETOKENIZE_PATTERN).findall
        self._cache = _WordCache(models.BPE(self.encoder, merges), self._MAX_CACHE_ENTRIES)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.encoder

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self.decoder

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        # C-level iteration: each pre-token's ids from the cache (a miss runs _WordCache.__missing__)
        return list(chain.from_iterable(map(self._cache.__getitem__, self._findall(text))))

    def detokenize(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


class _WordCache(dict):
    """Pre-token -> GPT-2 ids; a missing word is mapped to byte symbols and merged by the Rust BPE model."""

    def __init__(self, bpe, max_entries: int):
        super().__init__()
        self.bpe, self.max_entries = bpe, max_entries
        # str.translate table: the latin-1 decoding of a byte b is chr(b); map it to the BPE symbol
        self.byte_table = {b: c for b, c in bytes_to_unicode().items()}

    def __missing__(self, word: str) -> tuple:
        symbols = word.encode("utf-8").decode("latin-1").translate(self.byte_table)
        ids = tuple(t.id for t in self.bpe.tokenize(symbols))
        if len(self) >= self.max_entries:
            self.clear()
        self[word] = ids
        return ids


def _read_gpt2_vocab(vocab_file: str) -> Dict[str, int]:
    """encoder.json, checked: a JSON object whose ids are exactly 0..n-1 and which holds the 256 byte symbols (a
    changed digit or a merged key breaks the first; BPE needs the second)."""
    try:
        with open(vocab_file, "rb") as f:
            encoder = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"--vocab-file {vocab_file}: not a GPT-2 vocabulary JSON ({str(e).splitlines()[0][:100]}); "
                        f"the file is corrupted or of another kind") from None
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise DataError(f"--vocab-file {vocab_file}: expected a JSON object of token -> integer id")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise DataError(f"--vocab-file {vocab_file}: token ids are not 0..{len(encoder) - 1} each once; the file is "
                        f"corrupted")
    missing = [c for c in bytes_to_unicode().values() if c not in encoder]
    if missing:
        raise DataError(f"--vocab-file {vocab_file}: lacks the byte symbol {missing[0]!r} every GPT-2 vocabulary "
                        f"holds; the file is corrupted")
    return encoder


def _read_gpt2_merges(merge_file: str, encoder: Dict[str, int], vocab_file: str) -> List[tuple]:
    """vocab.bpe, checked: each line after the version line is two symbols whose parts and concatenation are in
    the vocabulary (what encoding needs; a changed byte almost always breaks it)."""
    try:
        with open(merge_file, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"--merge-file {merge_file}: not UTF-8 text ({e.reason} at byte {e.start}); the file is "
                        f"corrupted") from None
    merges = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        pair = tuple(line.split())
        if len(pair) != 2:
            raise DataError(f"--merge-file {merge_file}: line {number} has {len(pair)} symbols, expected 2; the file "
                            f"is corrupted")
        bad = next((t for t in (pair[0], pair[1], pair[0] + pair[1]) if t not in encoder), None)
        if bad is not None:
            raise DataError(f"--merge-file {merge_file}: line {number} ({line[:40]!r}) needs {bad!r}, which "
                            f"--vocab-file {vocab_file} lacks; one of the two files is corrupted, or they do not "
                            f"belong together")
        merges.append(pair)
    return merges


class SentencePieceTokenizer(AbstractTokenizer):
    """Wraps a SentencePiece model file.

    EOD choice: if the model contains a ``<|endoftext|>`` piece (a user-defined symbol, as in
    models converted from GPT-style vocabularies) that id is the EOD; otherwise the model's EOS id
    (``</s>``, id 2 in models written by ``tools/train_tokenizer.py``). A model with neither is refused.
    """

    def __init__(self, model_file: str):
        super().__init__("SentencePieceTokenizer")
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        n = self.sp.get_piece_size()
        self._vocab = {self.sp.id_to_piece(i): i for i in range(n)}
        self._inv_vocab = {i: p for p, i in self._vocab.items()}
        if GPT2_EOD_TOKEN in self._vocab:
            self._eod = self._vocab[GPT2_EOD_TOKEN]
        elif self.sp.eos_id() >= 0:
            self._eod = self.sp.eos_id()
        else:
            raise DataError(
                f"--tokenizer-model {model_file} has neither an EOS id nor a {GPT2_EOD_TOKEN} piece; "
                "retrain it with eos_id >= 0"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self._inv_vocab

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(AbstractTokenizer):
    """A Hugging Face ``tokenizer.json`` read by the `tokenizers` library, offline (Megatron-LM's
    ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``; DIR holds ``tokenizer.json``, or the path is
    that file).

    Encoding adds no BOS/EOS (the post-processor is skipped, as lm-evaluation-harness encodes for causal models)
    and special-token strings inside text are encoded as plain text, like the other tokenizers here. Sizes and ids
    include the added tokens (Megatron-LM's ``len(tokenizer)``). EOD: ``eos_token`` of ``tokenizer_config.json``
    beside the file when present, else the first of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>`` in
    the vocabulary; a tokenizer with none of these is refused.
    """

    EOD_CANDIDATES = (GPT2_EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>")

    def __init__(self, path: str):
        super().__init__("HuggingFaceTokenizer")
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._rust = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises plain Exception subclasses for a bad file
            raise DataError(f"--tokenizer-model {path}: {file} is not a Hugging Face tokenizer.json "
                            f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}); the file is "
                            f"corrupted or of another kind") from None
        self._rust.encode_special_tokens = True  # "<|endoftext|>" in text stays text
        self._vocab = self._rust.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        eos = _hf_config_eos(os.path.dirname(os.path.abspath(file)))
        names = ([eos] if eos else []) + [t for t in self.EOD_CANDIDATES if t != eos]
        found = next((t for t in names if t in self._vocab), None)
        if found is None:
            raise DataError(f"--tokenizer-model {path}: no end-of-document token (tokenizer_config.json eos_token "
                            f"{eos!r}, or one of {', '.join(self.EOD_CANDIDATES)}) in the vocabulary")
        self._eod = self._vocab[found]
        self._bos = self._vocab.get(_hf_config_eos(os.path.dirname(os.path.abspath(file)), "bos_token"))

    @property
    def vocab_size(self) -> int:
        return self._rust.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self._inv_vocab

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        return self._rust.encode(text, add_special_tokens=False).ids

    def tokenize_like_transformers(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """transformers' `encode`: special-token strings in the text become their ids, and with add_special_tokens
        the post-processor's tokens are added, e.g. Llama's BOS (what lm-evaluation-harness's `hf` model feeds a
        causal model)."""
        self._rust.encode_special_tokens = False
        try:
            return self._rust.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self._rust.encode_special_tokens = True

    @property
    def bos(self) -> Optional[int]:
        """``bos_token`` of ``tokenizer_config.json`` beside the file, when in the vocabulary; else None."""
        return self._bos

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._rust.decode([int(i) for i in ids], skip_special_tokens=False)


def _hf_config_eos(directory: str, key: str = "eos_token") -> Optional[str]:
    """``eos_token`` (or `key`) of ``tokenizer_config.json`` in `directory` (a string or an AddedToken dict), or None."""
    path = os.path.join(directory, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


def decode_continuation(tokenizer: AbstractTokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text of `new_ids` as it reads after the prompt: prompt + continuation decoded as one string, minus the
    prompt's own decoded text.

    Decoding the continuation alone is wrong for SentencePiece: a sequence's first piece loses its word-boundary
    space ("▁she" alone decodes to "she"), so a sample printed as prompt + decode(continuation) reads "andshe".
    When the prompt's text is not a prefix of the whole (a character whose bytes straddle the boundary), the
    continuation is decoded alone.
    """
    whole = tokenizer.detokenize(list(prompt_ids) + list(new_ids))
    prompt = tokenizer.detokenize(list(prompt_ids))
    if whole.startswith(prompt):
        return whole[len(prompt):]
    return tokenizer.detokenize(list(new_ids))


def _check_readable(flag: str, path: Optional[str], tokenizer_type: str) -> str:
    if not path:
        raise ConfigError(f"{flag} is required for --tokenizer-type {tokenizer_type}")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise DataError(f"{flag} {path}: file does not exist or is not readable")
    return path


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
) -> AbstractTokenizer:
    """Build the tokenizer named by ``--tokenizer-type``.

    Args:
        tokenizer_type: ``GPT2BPETokenizer``, ``SentencePieceTokenizer`` or ``HuggingFaceTokenizer``.
        vocab_file, merge_file: GPT-2 BPE files (``--vocab-file``, ``--merge-file``).
        tokenizer_model: SentencePiece ``.model`` file, or for HuggingFaceTokenizer a directory holding
            ``tokenizer.json`` (or that file) (``--tokenizer-model``).

    Raises:
        DataError naming the flag and path when a needed file is missing, unreadable or corrupted (a GPT-2
        vocabulary/merges pair is checked for consistency); ConfigError for a missing flag or an unknown
        ``--tokenizer-type``.
    """
    if tokenizer_type is None:
        raise ConfigError(f"--tokenizer-type is required ({' or '.join(TOKENIZER_TYPES)})")
    if tokenizer_type == "GPT2BPETokenizer":
        _check_readable("--vocab-file", vocab_file, tokenizer_type)
        _check_readable("--merge-file", merge_file, tokenizer_type)
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ConfigError("--tokenizer-model is required for --tokenizer-type HuggingFaceTokenizer (a directory "
                              "holding tokenizer.json, or the file)")
        file = os.path.join(tokenizer_model, "tokenizer.json") if os.path.isdir(tokenizer_model) else tokenizer_model
        if not os.path.isfile(file) or not os.access(file, os.R_OK):
            raise DataError(f"--tokenizer-model {tokenizer_model}: {file} does not exist or is not readable; give "
                            f"a directory holding tokenizer.json (e.g. a Hugging Face model directory)")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        _check_readable("--tokenizer-model", tokenizer_model, tokenizer_type)
        try:
            return SentencePieceTokenizer(tokenizer_model)
        except (RuntimeError, OSError) as e:
            raise DataError(f"--tokenizer-model {tokenizer_model}: not a SentencePiece model "
                            f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}); the file is corrupted or "
                            f"of another kind") from None
    raise ConfigError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")


def pad_vocab_size(orig_vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
    """Round the vocab up to a multiple of ``make_vocab_size_divisible_by * tensor_model_parallel_size``.

    Same as Megatron-LM's ``_vocab_size_with_padding``: every TP shard of the embedding gets an equal,
    GEMM-friendly slice. 50257 -> 50304 with the defaults.
    """
    if make_vocab_size_divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by ({make_vocab_size_divisible_by}) must be >= 1")
    if tensor_model_parallel_size < 1:
        raise ConfigError(f"--tensor-model-parallel-size ({tensor_model_parallel_size}) must be >= 1")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return ((orig_vocab_size + multiple - 1) // multiple) * multiple
