"""Reader and builder for Megatron-LM's mmap indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), byte for byte.

Index file layout (all little endian), identical to Megatron-LM's ``MMapIndexedDataset``:

    b"MMIDIDX\\x00\\x00"             9-byte magic
    <Q version = 1
    <B dtype code                   (DTYPE_CODES below; tokens are uint16 or int32)
    <Q number of sequences N
    <Q number of doc_idx entries D  (= documents + 1)
    int32[N]  sizes                 tokens per sequence
    int64[N]  pointers              byte offset of each sequence in the .bin file
    int64[D]  doc_idx               sequence index where each document starts, then N

The ``.bin`` file is the sequences' tokens back to back in the index's dtype.
"""

import os
import shutil
import struct
from typing import Optional

import numpy as np

from megatron.errors import DataError

_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8

# Megatron-LM megatron/core/datasets/indexed_dataset.py DType enum. (Older Megatron wrote
# 6: np.float and 7: np.double, both float64; token data never uses codes 6 and 7.)
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(DataError):
    """A missing, truncated or malformed ``.bin``/``.idx`` file; the message names the file."""


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def best_fitting_dtype(vocab_size: Optional[int] = None) -> type:
    """uint16 when every id fits (vocab < 65500, Megatron's threshold), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype) -> int:
    """Megatron's numeric code for a numpy dtype."""
    try:
        return _CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no Megatron indexed-dataset code") from None


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class MMapIndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx``; ``ds[i]`` is sequence i as a numpy array.

    Args:
        prefix: path without the ``.bin``/``.idx`` suffix.

    Raises:
        IndexedDatasetError naming the file when either file is missing, the magic/version/dtype
        is wrong, or the files are shorter than the header says.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: missing (expected the output of tools/preprocess_data.py)")
        self._read_index(idx_path)
        self._check_index(idx_path)
        bin_size = os.path.getsize(bin_path)
        expected = int(self._pointers[-1]) + int(self._sizes[-1]) * self.dtype().itemsize if len(self._sizes) else 0
        if bin_size != expected:
            raise IndexedDatasetError(f"{bin_path}: {'truncated' if bin_size < expected else 'longer than its index'} "
                                      f"({bin_size} bytes, {idx_path} describes {expected}); rebuild it with "
                                      f"tools/preprocess_data.py")
        # np.memmap refuses empty files; an empty dataset needs no mapping.
        self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r") if bin_size else np.zeros(0, np.uint8)

    def _read_index(self, idx_path: str) -> None:
        file_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES:
            raise IndexedDatasetError(f"{idx_path}: truncated header ({len(header)} of {_HEADER_BYTES} bytes)")
        if header[:9] != _INDEX_MAGIC:
            raise IndexedDatasetError(f"{idx_path}: bad magic {header[:9]!r}, not a Megatron mmap index (MMIDIDX)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != _INDEX_VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (expected 1)")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        n_seq, n_doc = struct.unpack("<QQ", header[18:34])
        needed = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if file_size != needed:
            raise IndexedDatasetError(
                f"{idx_path}: {'truncated' if file_size < needed else 'longer than its header says'} ({file_size} "
                f"bytes, header promises {n_seq} sequences and {n_doc} doc_idx entries = {needed})"
            )
        buf = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = _HEADER_BYTES
        self._sizes = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self._pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self._doc_idx = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)
        self._idx_buf = buf

    def _check_index(self, idx_path: str) -> None:
        """The index's own consistency, as every Megatron builder writes it: sizes >= 0; sequences back to back in
        the .bin (pointer i + 1 = pointer i + size i * itemsize, starting at 0); doc_idx rising from 0 to at most N. A
        changed byte in sizes or pointers always breaks this; one in doc_idx may not (GPT training does not read
        doc_idx: its documents are the sequences)."""
        sizes, pointers, doc_idx = self._sizes, self._pointers, self._doc_idx
        n, itemsize = len(sizes), np.dtype(self.dtype).itemsize
        problem = None
        if n and sizes.min() < 0:
            problem = "a negative sequence size"
        elif n and (pointers[0] != 0 or np.any(np.diff(pointers) != sizes[:-1].astype(np.int64) * itemsize)):
            problem = "sequence pointers that do not follow the sizes"
        elif len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] > n or np.any(np.diff(doc_idx) < 0):
            problem = f"a doc_idx that does not rise from 0 to at most {n}"
        if problem:
            raise IndexedDatasetError(f"{idx_path}: corrupted index ({problem}); rebuild it with "
                                      f"tools/preprocess_data.py")

    # Pickle by prefix (DataLoader workers under spawn) instead of copying the mapped files.
    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, idx: int) -> np.ndarray:
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        size = int(self._sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: sequence {idx} has {size} tokens; asked for [{offset}, {offset + length})")
        itemsize = np.dtype(self.dtype).itemsize
        start = int(self._pointers[idx]) + offset * itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    @property
    def sizes(self) -> np.ndarray:
        """int32[N]: tokens per sequence."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        """int64[documents + 1]: first sequence of each document, then N."""
        return self._doc_idx


class MMapIndexedDatasetBuilder:
    """Streams sequences into ``.bin`` and writes the ``.idx`` at ``finalize``.

    Args:
        bin_path: the ``.bin`` file to create (truncated if it exists).
        dtype: token dtype; use ``best_fitting_dtype(vocab_size)``.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self._dtype = np.dtype(dtype)
        dtype_code(self._dtype)  # reject dtypes Megatron cannot describe before writing anything
        self._bin_path = bin_path
        self._file = open(bin_path, "wb")
        self._sizes = []
        self._doc_idx = [0]

    def add_item(self, tokens) -> None:
        """Append one sequence (list, numpy array or torch tensor of ids)."""
        if hasattr(tokens, "numpy"):
            tokens = tokens.numpy()
        arr = np.asarray(tokens, dtype=self._dtype)
        self._file.write(arr.tobytes(order="C"))
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_prefix: str) -> None:
        """Append every sequence and document of another dataset with the same dtype."""
        other = MMapIndexedDataset(another_prefix)
        if np.dtype(other.dtype) != self._dtype:
            raise IndexedDatasetError(f"{index_file_path(another_prefix)}: dtype {np.dtype(other.dtype)} != builder dtype {self._dtype}")
        offset = len(self._sizes)
        self._sizes.extend(other.sizes.tolist())
        self._doc_idx.extend((offset + other.doc_idx[1:]).tolist())
        self._file.flush()
        with open(data_file_path(another_prefix), "rb") as f:
            shutil.copyfileobj(f, self._file)

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` and write the index to ``idx_path``."""
        self._file.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self._dtype.itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        with open(idx_path, "wb") as f:
            f.write(_INDEX_MAGIC)
            f.write(struct.pack("<Q", _INDEX_VERSION))
            f.write(struct.pack("<B", dtype_code(self._dtype)))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))


def make_builder(bin_path: str, vocab_size: Optional[int] = None) -> MMapIndexedDatasetBuilder:
    return MMapIndexedDatasetBuilder(bin_path, dtype=best_fitting_dtype(vocab_size))
