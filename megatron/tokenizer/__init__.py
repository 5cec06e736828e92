"""Tokenizers behind one small interface: GPT-2 byte-level BPE and SentencePiece."""

from megatron.tokenizer.tokenizer import (
    AbstractTokenizer,
    GPT2BPETokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    decode_continuation,
    pad_vocab_size,
)

__all__ = ["AbstractTokenizer", "GPT2BPETokenizer", "SentencePieceTokenizer", "build_tokenizer", "decode_continuation",
           "pad_vocab_size"]
