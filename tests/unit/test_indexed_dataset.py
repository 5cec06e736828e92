"""Mmap indexed dataset: round trips, byte layout checked by a reader/writer written here from the format spec, errors."""

import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    make_builder,
)

# Megatron-LM megatron/core/datasets/indexed_dataset.py, class DType.
MEGATRON_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def spec_read(prefix):
    """Independent reader: the index layout from the Megatron format description, parsed with struct."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    sizes = struct.unpack_from(f"<{n_seq}i", raw, off)
    off += 4 * n_seq
    pointers = struct.unpack_from(f"<{n_seq}q", raw, off)
    off += 8 * n_seq
    doc_idx = struct.unpack_from(f"<{n_doc}q", raw, off)
    assert off + 8 * n_doc == len(raw)
    dtype = np.dtype(MEGATRON_CODES[code]).newbyteorder("<")
    data = open(prefix + ".bin", "rb").read()
    seqs = [np.frombuffer(data, dtype=dtype, count=s, offset=p).tolist() for s, p in zip(sizes, pointers)]
    return version, code, list(sizes), list(pointers), list(doc_idx), seqs


def spec_write(prefix, docs, code):
    """Independent writer: one sequence per document."""
    dtype = np.dtype(MEGATRON_CODES[code])
    sizes = [len(d) for d in docs]
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) * dtype.itemsize
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QB", 1, code) + struct.pack("<QQ", len(docs), len(docs) + 1))
        f.write(struct.pack(f"<{len(docs)}i", *sizes))
        f.write(struct.pack(f"<{len(docs)}q", *pointers.tolist()))
        f.write(struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))


def _docs(vocab, n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


def test_codes_match_megatron():
    assert {k: np.dtype(v) for k, v in DTYPE_CODES.items()} == {k: np.dtype(v) for k, v in MEGATRON_CODES.items()}
    assert best_fitting_dtype(50257) is np.uint16
    assert best_fitting_dtype(65499) is np.uint16
    assert best_fitting_dtype(65500) is np.int32
    assert best_fitting_dtype(None) is np.int32


@pytest.mark.parametrize("vocab, code", [(50257, 8), (200_000, 4)])
def test_round_trip_and_spec_layout(tmp_path, vocab, code):
    docs = _docs(vocab)
    prefix = str(tmp_path / "ds")
    builder = make_builder(prefix + ".bin", vocab_size=vocab)
    for d in docs:
        builder.add_item(np.asarray(d))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    version, got_code, sizes, pointers, doc_idx, seqs = spec_read(prefix)
    assert (version, got_code) == (1, code)
    assert sizes == [len(d) for d in docs]
    assert doc_idx == list(range(len(docs) + 1))
    assert seqs == docs

    ds = MMapIndexedDataset(prefix)
    assert ds.dtype is MEGATRON_CODES[code]
    assert len(ds) == len(docs)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.sizes.tolist() == sizes and ds.doc_idx.tolist() == doc_idx
    i = max(range(len(docs)), key=lambda k: len(docs[k]))
    assert ds.get(i, offset=3, length=5).tolist() == docs[i][3:8]
    assert ds.get(i, offset=3).tolist() == docs[i][3:]
    with pytest.raises(IndexError):
        ds.get(i, offset=len(docs[i]), length=1)


def test_reads_spec_written_files(tmp_path):
    docs = _docs(1000, seed=3)
    prefix = str(tmp_path / "ext")
    spec_write(prefix, docs, code=4)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype is np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == docs


def test_multi_sequence_documents_and_merge(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    builder = MMapIndexedDatasetBuilder(a + ".bin", dtype=np.uint16)
    builder.add_item([1, 2])
    builder.add_item([3])
    builder.end_document()
    builder.add_item([4, 5, 6])
    builder.end_document()
    builder.finalize(a + ".idx")
    assert MMapIndexedDataset(a).doc_idx.tolist() == [0, 2, 3]

    merged = str(tmp_path / "m")
    builder = MMapIndexedDatasetBuilder(merged + ".bin", dtype=np.uint16)
    builder.add_item([9])
    builder.end_document()
    builder.merge_file_(a)
    builder.finalize(merged + ".idx")
    _, _, sizes, pointers, doc_idx, seqs = spec_read(merged)
    assert seqs == [[9], [1, 2], [3], [4, 5, 6]]
    assert doc_idx == [0, 1, 3, 4]
    assert pointers == [0, 2, 6, 8]

    other = MMapIndexedDatasetBuilder(b + ".bin", dtype=np.int32)
    with pytest.raises(IndexedDatasetError, match="dtype"):
        other.merge_file_(a)


def _write_small(prefix):
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in ([1, 2, 3], [4, 5]):
        builder.add_item(d)
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_bad_magic(tmp_path):
    prefix = str(tmp_path / "bad")
    _write_small(prefix)
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[:7] = b"TNTIDX\x00"
    open(prefix + ".idx", "wb").write(raw)
    with pytest.raises(IndexedDatasetError, match=r"bad\.idx: bad magic"):
        MMapIndexedDataset(prefix)


@pytest.mark.parametrize("keep", [5, 30, 40])
def test_truncated_index(tmp_path, keep):
    prefix = str(tmp_path / "trunc")
    _write_small(prefix)
    raw = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(raw[:keep])
    with pytest.raises(IndexedDatasetError, match=r"trunc\.idx: truncated"):
        MMapIndexedDataset(prefix)


def test_truncated_bin_and_missing(tmp_path):
    prefix = str(tmp_path / "tb")
    _write_small(prefix)
    raw = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(raw[:-2])
    with pytest.raises(IndexedDatasetError, match=r"tb\.bin: truncated"):
        MMapIndexedDataset(prefix)
    with pytest.raises(IndexedDatasetError, match=r"nothere\.idx: missing"):
        MMapIndexedDataset(str(tmp_path / "nothere"))
    with pytest.raises(IndexedDatasetError):  # it is also a ValueError, for callers that catch those
        raise IndexedDatasetError("x")
    assert issubclass(IndexedDatasetError, ValueError)
