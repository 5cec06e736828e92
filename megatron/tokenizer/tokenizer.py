"""The tokenizer interface, its GPT-2 BPE and SentencePiece implementations, and `build_tokenizer`."""

import json
import logging
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import regex

from megatron.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# OpenAI's GPT-2 pre-tokenizer: contractions, letter runs, number runs, other-symbol runs, whitespace.
GPT2_PRETOKENIZE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOD_TOKEN = "<|endoftext|>"
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer")


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


def _get_pairs(word: Sequence[str]) -> set:
    return set(zip(word[:-1], word[1:]))


class GPT2BPETokenizer(AbstractTokenizer):
    """Byte-level BPE exactly as OpenAI's GPT-2 ``encoder.py`` (same ids for the same text).

    Args:
        vocab_file: ``encoder.json`` / ``gpt2-vocab.json`` (token string -> id).
        merge_file: ``vocab.bpe`` / ``gpt2-merges.txt`` (``#version`` line, then one merge per line,
            highest priority first).

    Encoding is cached per pre-token word (id tuple), which is what makes preprocessing a large
    corpus fast: novels reuse a small set of words, so almost every word is a dictionary hit.
    """

    _MAX_CACHE_ENTRIES = 2_000_000  # a safety valve for adversarial inputs; typical corpora stay far below

    def __init__(self, vocab_file: str, merge_file: str):
        super().__init__("GPT2BPETokenizer")
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: Dict[str, int] = json.load(f)
        self.decoder: Dict[int, str] = {v: k for k, v in self.encoder.items()}
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        self.bpe_ranks: Dict[tuple, int] = dict(zip(merges, range(len(merges))))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        # str.translate table: the latin-1 decoding of a byte b is chr(b); map it to the BPE symbol.
        self._byte_table = {b: self.byte_encoder[b] for b in range(256)}
        self.pattern = regex.compile(GPT2_PRETOKENIZE_PATTERN)
        self._cache: Dict[str, tuple] = {}
        if GPT2_EOD_TOKEN not in self.encoder:
            raise DataError(f"--vocab-file {vocab_file} has no {GPT2_EOD_TOKEN} entry; is it a GPT-2 vocab?")
        self._eod = self.encoder[GPT2_EOD_TOKEN]

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

    def bpe(self, token: str) -> List[str]:
        """Merge the byte symbols of one pre-token by merge rank (lowest rank first)."""
        word = list(token)
        if len(word) < 2:
            return word
        ranks = self.bpe_ranks
        while True:
            pairs = _get_pairs(word)
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = new_word
            if len(word) == 1:
                break
        return word

    def _encode_word(self, word: str) -> tuple:
        symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
        ids = tuple(self.encoder[piece] for piece in self.bpe(symbols))
        if len(self._cache) >= self._MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> List[int]:
        # "<|endoftext|>" inside text is encoded as ordinary characters, like OpenAI's encoder and
        # Megatron-LM; the EOD id only enters the data through --append-eod.
        cache = self._cache
        ids: List[int] = []
        for word in self.pattern.findall(text):
            hit = cache.get(word)
            ids.extend(hit if hit is not None else self._encode_word(word))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


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
        tokenizer_type: ``GPT2BPETokenizer`` or ``SentencePieceTokenizer``.
        vocab_file, merge_file: GPT-2 BPE files (``--vocab-file``, ``--merge-file``).
        tokenizer_model: SentencePiece ``.model`` file (``--tokenizer-model``).

    Raises:
        DataError naming the flag and path when a needed file is missing, unreadable or malformed;
        ConfigError naming the flag when it is missing, or ``--tokenizer-type`` when the type is unknown.
    """
    if tokenizer_type is None:
        raise ConfigError(f"--tokenizer-type is required ({' or '.join(TOKENIZER_TYPES)})")
    if tokenizer_type == "GPT2BPETokenizer":
        _check_readable("--vocab-file", vocab_file, tokenizer_type)
        _check_readable("--merge-file", merge_file, tokenizer_type)
        try:
            return GPT2BPETokenizer(vocab_file, merge_file)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: cannot parse ({e})") from e
    if tokenizer_type == "SentencePieceTokenizer":
        _check_readable("--tokenizer-model", tokenizer_model, tokenizer_type)
        try:
            return SentencePieceTokenizer(tokenizer_model)
        except (RuntimeError, OSError) as e:
            raise DataError(f"--tokenizer-model {tokenizer_model}: not a SentencePiece model ({e})") from e
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
