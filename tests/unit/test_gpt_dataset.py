"""GPTDataset index mappings, blending and the resumable sampler, against brute-force references written here."""

import os
import re

import numpy as np
import pytest
import torch

from megatron.data import (
    BlendableDataset,
    GPTDataset,
    MegatronPretrainingSampler,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    build_pretraining_data_loader,
    build_train_valid_test_datasets,
    parse_data_path,
    parse_split,
)
from megatron.data.blendable_dataset import build_blending_indices
from megatron.data.gpt_dataset import build_sample_idx


def write_dataset(prefix, n_docs=12, seed=0, empty_doc=None, offset=0):
    """Documents of 0..30 tokens; token values encode (document, position) so mix-ups are visible."""
    rng = np.random.default_rng(seed)
    docs = []
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in range(n_docs):
        length = 0 if d == empty_doc else int(rng.integers(1, 30))
        doc = [offset + d * 1000 + t for t in range(length)]
        docs.append(doc)
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return docs


def megatron_sample_idx_loop(sizes, doc_idx, seq_length, num_samples):
    """Port of Megatron-LM helpers.cpp build_sample_idx (the reference for the vectorised version)."""
    out = [(0, 0)]
    doc_idx_index, doc_offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_idx_index]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        out.append((doc_idx_index, doc_offset))
    return np.array(out)


@pytest.mark.parametrize("seq_length", [1, 4, 7, 29])
def test_sample_idx_matches_megatron_loop(seq_length):
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(0, 12, size=40).astype(np.int32)
    sizes[[0, 5, 6]] = [0, 0, 0]  # empty documents, including the first
    doc_idx = rng.permutation(np.tile(np.arange(40), 3)).astype(np.int32)
    num_samples = (int(sizes[doc_idx].sum()) - 1) // seq_length
    got = build_sample_idx(sizes, doc_idx, seq_length, num_samples)
    np.testing.assert_array_equal(got, megatron_sample_idx_loop(sizes, doc_idx, seq_length, num_samples))


@pytest.mark.parametrize("num_samples", [10, 25, 57])  # one epoch, a short separate last epoch, several epochs
def test_samples_tile_the_shuffled_stream(tmp_path, num_samples):
    prefix = str(tmp_path / "ds")
    docs = write_dataset(prefix, empty_doc=4)
    indexed = MMapIndexedDataset(prefix)
    documents = np.arange(2, 11)
    seq = 8
    ds = GPTDataset("train", indexed, documents, num_samples, seq, seed=1234, cache_dir=str(tmp_path / "cache"))
    assert len(ds) >= num_samples

    epochs = len(ds.doc_idx) // len(documents)
    doc_idx = np.asarray(ds.doc_idx).reshape(epochs, len(documents))
    for row in doc_idx:  # every epoch visits every document of the split exactly once
        assert sorted(row.tolist()) == documents.tolist()
    stream = [t for d in np.asarray(ds.doc_idx) for t in docs[d]]
    assert sorted(np.asarray(ds.shuffle_idx).tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        j = int(ds.shuffle_idx[i])
        sample = ds[i]["text"]
        assert sample.dtype == np.int64 and sample.shape == (seq + 1,)
        assert sample.tolist() == stream[j * seq: j * seq + seq + 1]
    # Each token of each epoch appears as an input exactly once (samples overlap only in their label token).
    tokens_per_epoch = sum(len(docs[d]) for d in documents)
    covered = sorted(t for i in range(len(ds)) for t in ds[i]["text"][:-1].tolist())
    assert covered == sorted(stream[: len(ds) * seq])
    assert len(ds) == (epochs * tokens_per_epoch - 1) // seq


def test_short_last_epoch_is_served_after_full_epochs(tmp_path):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix)
    indexed = MMapIndexedDataset(prefix)
    documents = np.arange(12)
    seq = 8
    tokens = int(indexed.sizes.sum())
    per_epoch = (tokens - 1) // seq
    ds = GPTDataset("train", indexed, documents, per_epoch + 2, seq, seed=5, cache_dir=str(tmp_path / "c"))
    first_epoch_samples = (tokens - 1) // seq
    assert sorted(np.asarray(ds.shuffle_idx[:first_epoch_samples]).tolist()) == list(range(first_epoch_samples))


def test_determinism_and_cache_reuse(tmp_path):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix)
    indexed = MMapIndexedDataset(prefix)
    cache = str(tmp_path / "cache")
    docs = np.arange(12)
    calls = []
    a = GPTDataset("train", indexed, docs, 30, 8, seed=1, cache_dir=cache, barrier=lambda: calls.append(1))
    assert a.built_cache and calls == [1]
    mtimes = {p: os.stat(p).st_mtime_ns for p in a.cache_paths.values()}
    b = GPTDataset("train", indexed, docs, 30, 8, seed=1, cache_dir=cache)
    assert not b.built_cache and b.cache_paths == a.cache_paths
    assert {p: os.stat(p).st_mtime_ns for p in b.cache_paths.values()} == mtimes
    samples_a = [a[i]["text"].tolist() for i in range(len(a))]
    assert samples_a == [b[i]["text"].tolist() for i in range(len(b))]

    c = GPTDataset("train", indexed, docs, 30, 8, seed=2, cache_dir=cache)
    assert c.built_cache and c.cache_paths != a.cache_paths
    assert samples_a != [c[i]["text"].tolist() for i in range(len(c))]

    # A non-zero rank never builds: it waits on the barrier and fails clearly if nothing appeared.
    with pytest.raises(ValueError, match="missing after rank 0 built it"):
        GPTDataset("train", indexed, docs, 30, 8, seed=3, cache_dir=cache, rank=1, barrier=lambda: None)


def test_default_cache_dir_and_too_little_data(tmp_path):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix, n_docs=2)
    indexed = MMapIndexedDataset(prefix)
    ds = GPTDataset("valid", indexed, np.arange(2), 3, 4, seed=0)
    assert all(os.path.dirname(p) == str(tmp_path / "index-cache") for p in ds.cache_paths.values())
    with pytest.raises(ValueError, match="--seq-length"):
        GPTDataset("valid", indexed, np.arange(2), 3, 10_000, seed=0)


@pytest.mark.parametrize(
    "split, size, expected",
    [("969,30,1", 1000, [0, 969, 999, 1000]), ("8,1,1", 10, [0, 8, 9, 10]), ("100,0,0", 7, [0, 7, 7, 7]),
     ("1", 5, [0, 5, 5, 5]), ("98/2", 100, [0, 98, 100, 100]), ("1,1,1", 10, [0, 4, 7, 10]), ("949,50,1", 126, [0, 120, 126, 126])],
)
def test_parse_split(split, size, expected):
    # Expected values worked by hand from Megatron's get_train_valid_test_split_ (round each part,
    # move the rounding error off every boundary after the first).
    assert parse_split(split, size) == expected


def test_parse_split_errors():
    with pytest.raises(ValueError, match="--split 'a,b'"):
        parse_split("a,b", 10)
    with pytest.raises(ValueError, match="--split"):
        parse_split("0,0,0", 10)


def _flatten_global(sampler_factory, dp_size):
    """Indices of every rank's micro-batches, global batch by global batch."""
    per_rank = [list(sampler_factory(r)) for r in range(dp_size)]
    out = []
    for step in zip(*per_rank):
        for mb in step:
            out.extend(mb)
    return per_rank, out


@pytest.mark.parametrize("mbs, dp", [(1, 1), (3, 1), (2, 2), (3, 4)])
def test_sampler_resumes_at_any_consumed_count(mbs, dp):
    total = 61
    gb = mbs * dp
    ranks0, flat0 = _flatten_global(lambda r: MegatronPretrainingSampler(total, 0, mbs, r, dp), dp)
    assert flat0 == list(range((total // gb) * gb))
    for k in range(0, total + 1):
        ranks_k, flat_k = _flatten_global(lambda r: MegatronPretrainingSampler(total, k, mbs, r, dp), dp)
        n_full = (total - k) // gb
        assert flat_k == list(range(k, k + n_full * gb))  # the sample stream continues exactly at k
        if k % gb == 0:  # at batch boundaries (how training resumes) each rank replays its own tail
            for r in range(dp):
                assert ranks_k[r] == ranks0[r][k // gb:]
        for r in range(dp):
            assert len(MegatronPretrainingSampler(total, k, mbs, r, dp)) == len(ranks_k[r])


def test_sampler_keeps_last_partial_batch_when_asked():
    got = [list(MegatronPretrainingSampler(7, 0, 2, r, 2, drop_last=False)) for r in range(2)]
    assert got == [[[0, 1], [4, 5]], [[2, 3], [6]]]
    assert [len(MegatronPretrainingSampler(5, 0, 2, r, 2, drop_last=False)) for r in range(2)] == [2, 1]
    with pytest.raises(ValueError, match="consumed samples"):
        MegatronPretrainingSampler(10, 11, 1, 0, 1)
    with pytest.raises(ValueError, match="--micro-batch-size"):
        MegatronPretrainingSampler(10, 0, 0, 0, 1)


def test_data_loader_batches(tmp_path):
    prefix = str(tmp_path / "ds")
    write_dataset(prefix)
    train, valid, test = build_train_valid_test_datasets([prefix], "10,2,0", (20, 3, 5), seq_length=6, seed=7,
                                                         cache_dir=str(tmp_path / "c"))
    assert test is None and valid is not None
    loader = build_pretraining_data_loader(train, consumed_samples=4, micro_batch_size=2, dp_rank=1, dp_size=2, num_workers=0)
    batches = list(loader)
    assert len(batches) == (len(train) - 4) // 4
    first = batches[0]["text"]
    assert first.dtype == torch.int64 and first.shape == (2, 7)
    assert first.tolist() == [train[6]["text"].tolist(), train[7]["text"].tolist()]
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None


def megatron_blending_loop(weights, size):
    """Port of Megatron-LM helpers.cpp build_blending_indices."""
    counts = [0] * len(weights)
    index, sample = [], []
    for i in range(size):
        x = max(float(i), 1.0)
        errors = [w * x - c for w, c in zip(weights, counts)]
        best = errors.index(max(errors))
        index.append(best)
        sample.append(counts[best])
        counts[best] += 1
    return index, sample


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.2, 0.5, 0.3], [1.0], [0.05, 0.95]])
def test_blending_indices(weights):
    size = 1000
    index, sample = build_blending_indices(weights, size)
    ref_index, ref_sample = megatron_blending_loop(weights, size)
    assert index.tolist() == ref_index and sample.tolist() == ref_sample
    for n in (10, 137, 1000):  # the greedy rule keeps every dataset within one sample of its share
        counts = np.bincount(index[:n], minlength=len(weights))
        assert np.all(np.abs(counts - np.asarray(weights) * n) <= 1.0 + 1e-9), (n, counts)


def test_parse_data_path():
    assert parse_data_path(["data/a"]) == (["data/a"], [1.0])
    assert parse_data_path("0.7 A 0.3 B") == (["A", "B"], [0.7, 0.3])
    prefixes, weights = parse_data_path(["2", "A", "6", "B"])
    assert prefixes == ["A", "B"] and weights == [0.25, 0.75]
    with pytest.raises(ValueError, match="--data-path .*3 items"):
        parse_data_path(["0.5", "A", "B"])
    with pytest.raises(ValueError, match="--data-path weight 'A'"):
        parse_data_path(["A", "B"])
    with pytest.raises(ValueError, match="--data-path weight -1"):
        parse_data_path(["-1", "A", "2", "B"])
    with pytest.raises(ValueError, match="--data-path is empty"):
        parse_data_path([])


def test_blended_train_valid_test(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_dataset(a, seed=1, offset=0)
    write_dataset(b, seed=2, offset=100_000)
    train, valid, test = build_train_valid_test_datasets(["0.75", a, "0.25", b], "10,2,0", (40, 8, 4), seq_length=6,
                                                         seed=3, cache_dir=str(tmp_path / "c"))
    assert isinstance(train, BlendableDataset) and len(train) == 40 and len(valid) == 8 and test is None
    from_b = sum(1 for i in range(len(train)) if train[i]["text"][0] >= 100_000)
    assert from_b == 10
    # each component was asked for ceil(n * w * 1.005) samples (Megatron's oversampling)
    assert len(train.datasets[0]) >= 31 and len(train.datasets[1]) >= 11
    with pytest.raises(ValueError, match="blend needs"):
        BlendableDataset([list(range(3)), list(range(3))], [0.5, 0.5], 10)


def test_pickles_by_reference(tmp_path):
    """DataLoader workers started with spawn receive the dataset pickled: paths, not copied arrays."""
    import pickle

    prefix = str(tmp_path / "ds")
    write_dataset(prefix)
    ds = GPTDataset("train", MMapIndexedDataset(prefix), np.arange(12), 10, 5, seed=0, cache_dir=str(tmp_path / "c"))
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert [clone[i]["text"].tolist() for i in range(len(ds))] == [ds[i]["text"].tolist() for i in range(len(ds))]


def test_corrupted_cache_file_is_rebuilt_with_a_log_line(tiny_corpus, tmp_path, caplog):
    """A changed .npy of the index cache is derived data: rank 0 rebuilds it (one warning naming it), equal to the
    original; a token id beyond the vocabulary is a DataError naming the .bin."""
    import logging

    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.errors import DataError

    indexed = MMapIndexedDataset(tiny_corpus["prefix"])
    docs = np.arange(len(indexed))
    a = GPTDataset("train", indexed, docs, 50, 16, 3, cache_dir=str(tmp_path / "c"), vocab_size=128)
    path = a.cache_paths["sample_idx"]
    original = open(path, "rb").read()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 1
    open(path, "wb").write(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        b = GPTDataset("train", indexed, docs, 50, 16, 3, cache_dir=str(tmp_path / "c"), vocab_size=128)
    said = [m for m in caplog.messages if path in m and "rebuilding the index cache" in m]
    assert b.built_cache and len(said) == 1 and open(path, "rb").read() == original
    with pytest.raises(DataError, match=r"document.bin: holds token id \d+, outside the tokenizer's 10 ids"):
        GPTDataset("train", indexed, docs, 50, 16, 3, cache_dir=str(tmp_path / "c"), vocab_size=10)


def test_data_error_in_a_loader_worker_is_one_line(tiny_corpus, tmp_path):
    """A DataError raised in a DataLoader worker (torch folds the worker's traceback into the message) reaches the
    caller as the one line it was."""
    from megatron.data import build_pretraining_data_loader, user_errors_unwrapped
    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.errors import DataError

    ds = GPTDataset("train", MMapIndexedDataset(tiny_corpus["prefix"]), np.arange(10), 20, 16, 3,
                    cache_dir=str(tmp_path / "c"), vocab_size=128)
    ds.vocab_size = 5  # as if the .bin had changed in place after its token ids were checked
    it = user_errors_unwrapped(build_pretraining_data_loader(ds, 0, 2, 0, 1, num_workers=1))
    with pytest.raises(DataError) as e:
        next(it)
    assert "\n" not in str(e.value) and re.match(r".*corpus_text_document.bin: sample \d+ holds token id \d+, outside "
                                                 r"the tokenizer's 5 ids", str(e.value)), str(e.value)


@pytest.mark.slow  # a real SIGINT to a loader with workers: ~6 s
def test_loader_worker_survives_ctrl_c(tiny_corpus, tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole process group: the DataLoader worker ignores it, so the main
    process (--exit-signal-handler) can finish its step, save and exit instead of dying on a lost worker."""
    import signal
    import time

    from megatron.data import build_pretraining_data_loader
    from megatron.data.indexed_dataset import MMapIndexedDataset

    ds = GPTDataset("train", MMapIndexedDataset(tiny_corpus["prefix"]), np.arange(10), 20, 16, 3,
                    cache_dir=str(tmp_path / "c"), vocab_size=128)
    want = [b["text"].tolist() for b in build_pretraining_data_loader(ds, 0, 2, 0, 1, num_workers=0)]
    it = iter(build_pretraining_data_loader(ds, 0, 2, 0, 1, num_workers=1))
    got = [next(it)["text"].tolist()]
    os.kill(it._workers[0].pid, signal.SIGINT)  # torch's private worker list: the one way to reach the worker
    time.sleep(0.5)  # delivered before the next fetch (without the handler the worker dies here)
    got += [b["text"].tolist() for b in it]
    assert got == want


def _flip_in_place_keeping_size_and_mtime(path, position, value, dtype):
    """Writes token `value` at token `position` of `path` in place and puts the old mtime back (as bit rot, or a
    rewrite within one kernel timestamp tick, leaves it)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(position * np.dtype(dtype).itemsize)
        f.write(np.array([value], dtype=dtype).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("split", ["train", "valid"])
def test_out_of_range_token_refused_at_start_even_with_size_and_mtime_unchanged(tmp_path, split):
    """The start-up check scans the split's .bin range at every start: a token id changed in place to one outside
    the vocabulary is refused although the .bin keeps its size and mtime and the index cache is intact (reused, not
    rebuilt); a change in the other split's range is that split's problem, not this one's."""
    from megatron.data.indexed_dataset import MMapIndexedDataset, data_file_path
    from megatron.errors import DataError

    prefix = str(tmp_path / "d")
    write_dataset(prefix, n_docs=12)
    indexed = MMapIndexedDataset(prefix)
    vocab = int(np.frombuffer(indexed._bin, dtype=indexed.dtype).max()) + 1  # every id in range, the largest used
    docs = {"train": np.arange(0, 8), "valid": np.arange(8, 12)}
    made = {k: GPTDataset(k, indexed, d, 4, 8, 3, cache_dir=str(tmp_path / "c"), vocab_size=vocab)
            for k, d in docs.items()}
    assert all(ds.built_cache for ds in made.values())
    other = "valid" if split == "train" else "train"
    last_doc = int(docs[split][-1])
    position = int(indexed.pointers[last_doc]) // np.dtype(indexed.dtype).itemsize + int(indexed.sizes[last_doc]) - 1
    del indexed, made
    dtype = np.dtype(MMapIndexedDataset(prefix).dtype)
    _flip_in_place_keeping_size_and_mtime(data_file_path(prefix), position, vocab, dtype)
    indexed = MMapIndexedDataset(prefix)
    with pytest.raises(DataError, match=rf"d.bin: holds token id {vocab}, outside the tokenizer's {vocab} ids"):
        GPTDataset(split, indexed, docs[split], 4, 8, 3, cache_dir=str(tmp_path / "c"), vocab_size=vocab)
    ok = GPTDataset(other, indexed, docs[other], 4, 8, 3, cache_dir=str(tmp_path / "c"), vocab_size=vocab)
    assert not ok.built_cache


def test_negative_token_id_refused_at_start_and_per_sample(tmp_path):
    """With a signed dtype (int32 data) a negative id is out of range too: refused at start-up and per sample."""
    from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, data_file_path
    from megatron.errors import DataError

    prefix = str(tmp_path / "s")
    b = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.RandomState(0)
    for _ in range(6):
        b.add_item(rng.randint(0, 50, size=20))
        b.end_document()
    b.finalize(prefix + ".idx")
    ds = GPTDataset("train", MMapIndexedDataset(prefix), np.arange(6), 4, 8, 3, cache_dir=str(tmp_path / "c"),
                    vocab_size=50)
    original = int(np.frombuffer(ds.indexed_dataset._bin, dtype=np.int32, count=1)[0])
    del ds
    _flip_in_place_keeping_size_and_mtime(data_file_path(prefix), 0, -7, np.int32)
    with pytest.raises(DataError, match=r"s.bin: holds token id -7, outside the tokenizer's 50 ids"):
        GPTDataset("train", MMapIndexedDataset(prefix), np.arange(6), 4, 8, 3, cache_dir=str(tmp_path / "c"),
                   vocab_size=50)
    # changed after start-up (the dataset built from good data): the per-sample check stops the samples holding it
    _flip_in_place_keeping_size_and_mtime(data_file_path(prefix), 0, original, np.int32)
    ds = GPTDataset("train", MMapIndexedDataset(prefix), np.arange(6), 4, 8, 3, cache_dir=str(tmp_path / "c"),
                    vocab_size=50)
    _flip_in_place_keeping_size_and_mtime(data_file_path(prefix), 0, -7, np.int32)
    refused = []
    for i in range(len(ds)):  # every token is in some sample of each epoch
        try:
            ds[i]
        except DataError as e:
            refused.append(str(e))
    assert refused and all(re.match(r".*s.bin: sample \d+ holds token id -7, outside the tokenizer's 50 ids", m)
                           for m in refused), refused
