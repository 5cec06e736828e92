"""GPTDataset: fixed-length training samples cut from one tokenized prefix, with Megatron's cached index mappings.

A sample is ``seq_length + 1`` consecutive tokens of a token stream made by concatenating the split's
documents in a shuffled order, epoch after epoch; consecutive samples share one boundary token (the
last label of one sample is the first input of the next), so every token is used exactly once per epoch.
Three arrays describe this and are cached as ``.npy`` files:

    doc_idx     int32[epochs * docs]   document order of the stream (a fresh permutation per epoch)
    sample_idx  int64[samples + 1, 2]  (position in doc_idx, token offset) where each sample starts
    shuffle_idx uint32|int64[samples]  the order samples are served in

beside a ``_checks.json`` written last: the xxh3-64 of each ``.npy``. A cache file that does not match (changed,
truncated, unreadable) is derived data, so rank 0 rebuilds it, saying so in one log line.

No token id outside ``[0, vocab_size)`` reaches the model: every start scans the split's ``.bin`` range (one
vectorised pass, never cached: a file's size and mtime do not tell whether its bytes changed), and every sample is
checked again as it is read (train, valid and test, in loader workers too); either is a DataError naming the ``.bin``.

Differences from Megatron-LM's legacy ``gpt_dataset.py``, on purpose: ``doc_idx`` shuffles each epoch
separately (Megatron shuffles all epochs jointly, so a document can repeat inside one "epoch" of
samples), and ``sample_idx`` is computed with a vectorised searchsorted instead of the C++ helper
(tests compare it with a port of that loop).
"""

import hashlib
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDataset, data_file_path
from megatron.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_INDEX_VERSION = "gpt-index-v2"  # bump when the index algorithm changes, so old caches are not reused


def parse_split(splits_string: str, size: int) -> List[int]:
    """Document boundaries ``[0, a, b, size]`` of the train/valid/test split, like Megatron's
    ``get_train_valid_test_split_``: ``"969,30,1"`` (or ``969/30/1``) is normalised to fractions,
    each part rounded, and the rounding error taken off the end.

    Split ``i`` holds documents ``range(bounds[i], bounds[i + 1])``.
    """
    sep = "," if "," in splits_string else "/"
    try:
        splits = [float(s) for s in splits_string.split(sep)]
    except ValueError:
        raise ConfigError(f"--split {splits_string!r} must be numbers separated by ',' or '/', e.g. 969,30,1") from None
    if len(splits) > 3 or any(s < 0 for s in splits) or sum(splits) <= 0:
        raise ConfigError(f"--split {splits_string!r} must have 1 to 3 non-negative weights with a positive sum")
    splits += [0.0] * (3 - len(splits))
    total = sum(splits)
    bounds = [0]
    for s in splits:
        bounds.append(bounds[-1] + int(round(s / total * float(size))))
    diff = bounds[-1] - size
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    assert bounds[-1] == size and len(bounds) == 4, bounds
    return bounds


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    # A sample needs seq_length + 1 tokens but shares its last one with the next sample, hence the -1.
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def _build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    doc_idx = np.empty((num_epochs, len(documents)), dtype=np.int32)
    for epoch in range(num_epochs):
        doc_idx[epoch] = documents
        rng.shuffle(doc_idx[epoch])
    return doc_idx.reshape(-1)


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Start ``(doc_idx position, offset)`` of samples ``0..num_samples`` (one extra row ends the last).

    Sample i starts at stream token ``i * seq_length``; row i is the document holding that token and the
    offset inside it, which is what Megatron's C++ ``build_sample_idx`` produces (it lands on the last
    token of a document rather than the start of the next one, and skips empty documents).
    """
    doc_lengths = sizes[doc_idx].astype(np.int64)
    cum_end = np.cumsum(doc_lengths)
    if num_samples * seq_length >= (cum_end[-1] if len(cum_end) else 0):
        raise ValueError(f"{num_samples} samples of {seq_length} tokens need more than the {cum_end[-1] if len(cum_end) else 0} tokens in doc_idx")
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    which = np.searchsorted(cum_end, positions, side="right")
    offsets = positions - (cum_end[which] - doc_lengths[which])
    sample_idx = np.stack([which, offsets], axis=1)
    sample_idx[0] = (0, 0)  # Megatron's convention, even when the first document is empty
    return sample_idx


def _build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    # Samples [0, num_samples) come from full epochs and are shuffled together; the samples of a
    # short separate last epoch are shuffled among themselves and served after them.
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_index_mappings(
    sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> Dict[str, np.ndarray]:
    """Compute doc_idx, sample_idx and shuffle_idx (Megatron's ``_build_index_mappings`` without the caching)."""
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    if tokens_per_epoch <= seq_length:
        raise DataError(
            f"the split has {tokens_per_epoch} tokens in {len(documents)} documents, fewer than "
            f"--seq-length + 1 ({seq_length + 1}); use more data or a shorter --seq-length"
        )
    num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    separate_last_epoch = False
    samples_before_last = 0
    if num_epochs > 1:
        # If the last epoch contributes only a few samples (< 80% of an epoch), keep them out of the
        # global shuffle so that full epochs are served first (Megatron's rule).
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        last_epoch_samples = num_samples - samples_before_last
        assert 0 <= last_epoch_samples <= samples_per_epoch + 1
        separate_last_epoch = last_epoch_samples < int(0.80 * samples_per_epoch)
    doc_idx = _build_doc_idx(documents, num_epochs, rng)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total_samples)
    first = samples_before_last if separate_last_epoch else total_samples
    shuffle_idx = _build_shuffle_idx(first, total_samples, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def _cache_key(name: str, prefix: str, documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int, seed: int) -> str:
    desc = {
        "version": _INDEX_VERSION,
        "name": name,
        "prefix": os.path.abspath(prefix),
        "split": [int(documents[0]), int(documents[-1]) + 1] if len(documents) else [0, 0],
        "num_documents": int(len(sizes)),
        "num_tokens": int(np.sum(sizes, dtype=np.int64)),  # invalidates the cache if the data is rebuilt
        "num_samples": int(num_samples),
        "seq_length": int(seq_length),
        "seed": int(seed),
    }
    return hashlib.md5(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _file_xxh3(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def token_id_range(indexed: MMapIndexedDataset, documents: np.ndarray) -> Tuple[int, int]:
    """(smallest, largest) token id in the .bin bytes of sequences documents.min() .. documents.max() (a split's
    range); (0, -1) when there are none. One sequential pass over the memory-mapped range, in pieces, never a copy."""
    if not len(documents):
        return 0, -1
    lo, hi = int(documents.min()), int(documents.max())
    itemsize = np.dtype(indexed.dtype).itemsize
    start, end = int(indexed.pointers[lo]), int(indexed.pointers[hi]) + int(indexed.sizes[hi]) * itemsize
    tokens = np.frombuffer(indexed._bin, dtype=indexed.dtype, count=(end - start) // itemsize, offset=start)
    signed = np.issubdtype(np.dtype(indexed.dtype), np.signedinteger)
    smallest, largest, step = 0, -1, 1 << 24
    for i in range(0, len(tokens), step):
        piece = tokens[i:i + step]
        largest = max(largest, int(piece.max()))
        if signed:  # an unsigned dtype cannot hold a negative id: skip the second pass
            smallest = min(smallest, int(piece.min()))
    return smallest, largest


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens from documents ``documents`` of one indexed dataset.

    Args:
        name: split name (``train``/``valid``/``test``), part of the cache key and log lines.
        indexed_dataset: the tokenized prefix.
        documents: int array of document (sequence) indices of this split.
        num_samples: samples the caller will draw; the dataset holds at least this many (whole epochs).
        seq_length: ``--seq-length``.
        seed: ``--seed``; same seed, same samples.
        cache_dir: where the index ``.npy`` files go (``--data-cache-path``); default
            ``<dir of prefix>/index-cache``.
        barrier: optional callable run by every rank between building and loading the cache.
        rank: only rank 0 builds a missing (or rebuilds a corrupted) cache; other ranks wait on ``barrier``, then
            check and load it.
        vocab_size: the tokenizer's vocabulary size; a token id outside [0, vocab_size) in the split's .bin range is a
            DataError naming the .bin, at every start (a fresh scan) and for every sample read.

    ``ds[i]`` returns ``{"text": int64[seq_length + 1]}``.
    """

    def __init__(
        self,
        name: str,
        indexed_dataset: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: Optional[str] = None,
        barrier: Optional[Callable[[], None]] = None,
        rank: int = 0,
        vocab_size: Optional[int] = None,
    ):
        if num_samples <= 0:
            raise ValueError(f"{name}: num_samples ({num_samples}) must be positive")
        if seq_length <= 0:
            raise ValueError(f"--seq-length ({seq_length}) must be positive")
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        documents = np.asarray(documents, dtype=np.int64)
        if len(documents) and (documents.min() < 0 or documents.max() >= len(indexed_dataset)):
            raise ValueError(f"{name}: document indices out of range for {indexed_dataset.prefix} ({len(indexed_dataset)} documents)")
        cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(indexed_dataset.prefix)), "index-cache")
        key = _cache_key(name, indexed_dataset.prefix, documents, indexed_dataset.sizes, num_samples, seq_length, seed)
        base = os.path.basename(indexed_dataset.prefix)
        paths = {k: os.path.join(cache_dir, f"{base}_{name}_{key}_{k}.npy") for k in ("doc_idx", "sample_idx", "shuffle_idx")}
        self.cache_paths = paths
        self.checks_path = os.path.join(cache_dir, f"{base}_{name}_{key}_checks.json")
        self.built_cache = False
        # the token-id scan runs here, on every rank, before the barrier below: ranks scan side by side (rank 0's
        # cache build overlaps the others' scans) instead of one rank waiting in a collective, with NCCL's timeout
        # (--distributed-timeout-minutes), while another scans
        self._check_vocabulary(documents)
        if rank == 0:
            problem = self._cache_problem() if all(os.path.isfile(p) for p in paths.values()) else "missing"
            if problem != "missing" and problem is not None:
                logger.warning("%s: %s; rebuilding the index cache (derived data)", name, problem)
            if problem is not None:
                self._build_cache(cache_dir, paths, documents, num_samples, seed)
        if barrier is not None:
            barrier()
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{name}: index cache {missing[0]} missing after rank 0 built it; is --data-cache-path "
                            f"shared by all ranks?")
        problem = None if self.built_cache else self._cache_problem()
        if problem is not None:  # rank 0 checked (and rebuilt) it before the barrier: it changed since
            raise DataError(f"{name}: {problem}; delete it to have it rebuilt")
        self._load_cache()
        logger.info("%s: %d samples (%d documents, %d doc_idx entries) from %s", name, len(self), len(documents), len(self.doc_idx), indexed_dataset.prefix)

    def _load_cache(self) -> None:
        for k in ("doc_idx", "sample_idx", "shuffle_idx"):
            try:
                setattr(self, k, np.load(self.cache_paths[k], mmap_mode="r", allow_pickle=False))
            except (ValueError, OSError, EOFError) as e:  # verified moments ago: changed since (or not shared)
                raise DataError(f"{self.cache_paths[k]}: unreadable index cache ({e}); delete it to have it "
                                f"rebuilt") from None

    def _cache_problem(self) -> Optional[str]:
        """None when the three .npy files match the xxh3-64 recorded in _checks.json; else what is wrong, naming the
        file."""
        try:
            with open(self.checks_path, "rb") as f:
                checks = json.loads(f.read().decode("utf-8"))
            recorded = {k: str(checks[k]) for k in self.cache_paths}
        except FileNotFoundError:
            return f"{self.checks_path} is missing"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{self.checks_path} is unreadable"
        for k, path in self.cache_paths.items():
            if _file_xxh3(path) != recorded[k]:
                return f"index cache {path} does not match its checksum (changed or truncated)"
        return None

    def _check_vocabulary(self, documents: np.ndarray) -> None:
        """Scans the split's .bin range now, on every rank and at every start (nothing cached: a .bin rewritten in
        place can keep its size and mtime, and bit rot changes neither), so that all ranks refuse the same data."""
        if self.vocab_size is None:
            return
        t0 = time.time()
        smallest, largest = token_id_range(self.indexed_dataset, documents)
        bad = smallest if smallest < 0 else largest if largest >= self.vocab_size else None
        if bad is not None:
            raise DataError(f"{data_file_path(self.indexed_dataset.prefix)}: holds token id {bad}, outside the "
                            f"tokenizer's {self.vocab_size} ids (0..{self.vocab_size - 1}); the data was tokenized "
                            f"with another tokenizer, or the file (or the tokenizer file) is corrupted")
        logger.debug("%s: token ids checked in %.3f s", self.name, time.time() - t0)

    # Pickle without the memory-mapped arrays (DataLoader workers under spawn); they are reopened.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("doc_idx", "sample_idx", "shuffle_idx")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load_cache()

    def _build_cache(self, cache_dir, paths, documents, num_samples, seed) -> None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"--data-cache-path {cache_dir}: cannot create ({e.strerror}); pass a writable directory") from e
        t0 = time.time()
        arrays = build_index_mappings(self.indexed_dataset.sizes, documents, num_samples, self.seq_length, seed)
        for k, path in paths.items():
            _save_atomic(path, arrays[k])
        checks = {k: _file_xxh3(path) for k, path in paths.items()}
        tmp = f"{self.checks_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(checks, f)
        os.replace(tmp, self.checks_path)  # last: a cache without it is rebuilt
        self.built_cache = True
        logger.info("%s: built index mappings in %.2f s into %s", self.name, time.time() - t0, cache_dir)

    def __len__(self) -> int:
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        idx = int(self.shuffle_idx[idx])
        doc_f, off_f = (int(x) for x in self.sample_idx[idx])
        doc_l, off_l = (int(x) for x in self.sample_idx[idx + 1])
        get = self.indexed_dataset.get
        if doc_f == doc_l:
            sample = get(int(self.doc_idx[doc_f]), offset=off_f, length=off_l - off_f + 1)
        else:
            parts = [get(int(self.doc_idx[doc_f]), offset=off_f)]
            parts.extend(get(int(self.doc_idx[i])) for i in range(doc_f + 1, doc_l))
            parts.append(get(int(self.doc_idx[doc_l]), length=off_l + 1))
            sample = np.concatenate(parts)
        if self.vocab_size is not None and len(sample):  # every sample read: no out-of-range id reaches the model
            smallest, largest = int(sample.min()), int(sample.max())
            if smallest < 0 or largest >= self.vocab_size:
                raise DataError(f"{data_file_path(self.indexed_dataset.prefix)}: sample {idx} holds token id "
                                f"{smallest if smallest < 0 else largest}, outside the tokenizer's {self.vocab_size} "
                                f"ids (0..{self.vocab_size - 1}); the file is corrupted (changed since start-up) or "
                                f"was tokenized with another tokenizer")
        return {"text": np.asarray(sample, dtype=np.int64)}


def build_gpt_datasets_for_prefix(
    prefix: str,
    splits_string: str,
    num_samples: Sequence[int],
    seq_length: int,
    seed: int,
    cache_dir: Optional[str] = None,
    barrier: Optional[Callable[[], None]] = None,
    rank: int = 0,
    vocab_size: Optional[int] = None,
) -> List[Optional[GPTDataset]]:
    """Train/valid/test GPTDatasets of one prefix; a split with no documents or no samples is None."""
    indexed = MMapIndexedDataset(prefix)
    bounds = parse_split(splits_string, len(indexed))
    out: List[Optional[GPTDataset]] = []
    for i, name in enumerate(("train", "valid", "test")):
        documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
        if len(documents) == 0 or num_samples[i] <= 0:
            out.append(None)
            continue
        out.append(GPTDataset(name, indexed, documents, num_samples[i], seq_length, seed, cache_dir, barrier, rank,
                              vocab_size))
    return out
