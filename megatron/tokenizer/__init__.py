"""Tokenizers behind one small interface: GPT-2 byte-level BPE, SentencePiece and Hugging Face tokenizer.json."""

from megatron.tokenizer.tokenizer import (
    AbstractTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    decode_continuation,
    pad_vocab_size,
)

__all__ = ["AbstractTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "build_tokenizer",
           "decode_continuation", "pad_vocab_size"]
