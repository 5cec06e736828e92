"""The expert store on disk: one 4 KiB-aligned record per (MoE layer, global expert) in one data file, and a
manifest (shapes, dtypes, offsets, a checksum per record) that says what the file holds.

The store knows files and records, not layers or models. Reads go through the project's aio handle with
O_DIRECT into caller-owned (page-locked) buffers, so they never touch the page cache; writes are atomic
(temporary file, fsync, rename: a store is either complete or absent, a full disk leaves nothing behind).
A training store ("mutable": Adam state, `create_store` / `open_training_store`) has the same layout, its bytes
reserved up front and its records rewritten in place (`write_from`), their checksums kept in memory.

    DIR/manifest.json   {"format": FORMAT, "version": VERSION, "source": {...}, "data_file": "experts.bin",
                         "data_bytes": n, "record_bytes": max record size, "records": [...]}
    DIR/experts.bin     records at multiples of ALIGN; each holds its tensors at multiples of TENSOR_ALIGN
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

FORMAT = "megatron-moe-expert-store"
VERSION = 1
ALIGN = 4096  # record alignment: O_DIRECT reads whole, aligned blocks
TENSOR_ALIGN = 64  # tensor alignment inside a record (cache lines; any dtype view)
MANIFEST = "manifest.json"
DATA_FILE = "experts.bin"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
# what a record's tensors may be: each keeps its dtype in the store (tagged in the manifest), and the model casts it
# to its compute dtype when it runs the expert (moe.experts.expert_rows_forward_)
STORE_DTYPES = tuple(_DTYPES.values())


class OffloadError(ValueError):
    """A user-fixable problem with the offload directory or its files (one line naming the file)."""


def checksum(buffer_u8: torch.Tensor) -> int:
    """xxh3-64 of a 1-D uint8 CPU tensor's bytes (~25 GB/s: cheap enough to check every read)."""
    import xxhash

    return xxhash.xxh3_64_intdigest(memoryview(buffer_u8.numpy()))


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class TensorSpec:
    name: str  # e.g. "w1_FD"
    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the record's start

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Record:
    layer: int  # MoE layer index (0-based among MoE layers)
    expert: int  # global expert id
    offset: int  # bytes from the data file's start (multiple of ALIGN)
    nbytes: int  # record size (multiple of ALIGN)
    checksum: int  # xxh3-64 of the record's nbytes bytes
    tensors: Tuple[TensorSpec, ...]


def _layout(tensors: Mapping[str, torch.Tensor]) -> Tuple[Tuple[TensorSpec, ...], int]:
    specs, pos = [], 0
    for name, t in tensors.items():
        spec = TensorSpec(name, tuple(t.shape), t.dtype, pos)
        specs.append(spec)
        pos = _round_up(pos + spec.nbytes, TENSOR_ALIGN)
    return tuple(specs), _round_up(max(pos, 1), ALIGN)


@dataclass(frozen=True)
class Filler:
    """A record tensor given by what writes its bytes: `fill(view_u8)` puts them into the record buffer's slice
    (a positioned read from a source file, say), so the writer makes no intermediate copy."""
    shape: Tuple[int, ...]
    dtype: torch.dtype
    fill: Callable[[torch.Tensor], None]


def pack_record(tensors: Mapping[str, torch.Tensor], specs: Tuple[TensorSpec, ...], nbytes: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The record's bytes as a 1-D uint8 tensor (zero padding between tensors). `out`: a buffer of nbytes to fill
    instead of a new one; its padding must be zero already (the tensors' slices are all overwritten)."""
    buf = torch.zeros(nbytes, dtype=torch.uint8) if out is None else out
    for spec in specs:
        t, view = tensors[spec.name], buf[spec.offset:spec.offset + spec.nbytes]
        if isinstance(t, Filler):
            t.fill(view)
        else:
            view.copy_(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8))
    return buf


class _RecordWriter:
    """Appends records to a new data file: O_DIRECT from one reused page-aligned buffer where the filesystem allows
    it (no page-cache copy of what is written: a store is as large as the experts), buffered writes otherwise."""

    def __init__(self, path: str):
        self.fd, self.direct = None, False
        if hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
                self.direct = True
            except OSError:
                self.fd = None
        if self.fd is None:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._free: List[list] = []  # [raw, aligned view, specs of the zero-padded layout it holds]

    def buffer(self, specs: Tuple[TensorSpec, ...], nbytes: int) -> list:
        """A free zero-padded nbytes buffer for a record of this layout ([raw, view, specs]; give it back with
        `release`): buffers are reused, and re-zeroed only when the layout changes."""
        slot = self._free.pop() if self._free else [None, None, None]
        if slot[1] is None or slot[1].numel() != nbytes:
            slot[0] = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
            skip = -slot[0].data_ptr() % ALIGN
            slot[1], slot[2] = slot[0][skip:skip + nbytes], None
        if slot[2] != specs:
            slot[1].zero_()
            slot[2] = specs
        return slot

    def release(self, slot: list) -> None:
        self._free.append(slot)

    def write_at(self, buf: torch.Tensor, offset: int) -> None:
        """Positioned write (several may run at once on different threads: their ranges never overlap)."""
        view, pos = memoryview(buf.numpy()), 0
        while pos < len(view):
            pos += os.pwrite(self.fd, view[pos:], offset + pos)

    def close(self, sync: bool) -> None:
        if self.fd is not None:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


def tensor_views(buffer_u8: torch.Tensor, record: Record) -> Dict[str, torch.Tensor]:
    """{name: view} of a record held in `buffer_u8` (1-D uint8, at least record.nbytes, any device)."""
    out = {}
    for spec in record.tensors:
        out[spec.name] = buffer_u8[spec.offset:spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
    return out


def write_store(directory: str, records: Iterable[Tuple[int, int, Mapping[str, torch.Tensor]]],
                source: dict, checkpoint: Optional[str] = None, fill_threads: int = 0) -> "ExpertStore":
    """Writes every (layer, expert, {name: tensor or Filler}) record and the manifest into `directory` atomically.

    `source` identifies what the records were made from (checked by ExpertStore.open(expected_source=...));
    `checkpoint` (the path they came from) is recorded for messages only. `fill_threads` > 0: records are packed
    (their Fillers run: reads), hashed and written (positioned writes) on that many threads, up to that many ahead
    of the oldest unfinished one; the tensors a record names must then stay valid until later records are drawn
    (fresh tensors, Fillers).
    Raises OffloadError naming the file on an unwritable directory or a full disk; nothing partial remains.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OffloadError(f"--moe-expert-store {directory}: cannot create it ({e.strerror})") from None
    data_path, tmp_data = os.path.join(directory, DATA_FILE), os.path.join(directory, DATA_FILE + ".tmp")
    man_path, tmp_man = os.path.join(directory, MANIFEST), os.path.join(directory, MANIFEST + ".tmp")
    entries: List[dict] = []
    pos = 0
    try:
        writer = _RecordWriter(tmp_data)
        pool = ThreadPoolExecutor(fill_threads) if fill_threads > 0 else None
        pending: deque = deque()  # (slot, future, entry) in record order

        def job(tensors, specs, nbytes, buf, offset):
            pack_record(tensors, specs, nbytes, out=buf)
            digest = checksum(buf)
            writer.write_at(buf, offset)
            return digest

        def finish_one():
            slot, fut, entry = pending.popleft()
            entry["checksum"] = fut.result()  # a failed read or write surfaces here, in order
            writer.release(slot)

        try:
            for layer, expert, tensors in records:
                for name, t in tensors.items():
                    if t.dtype not in STORE_DTYPES:
                        raise OffloadError(f"--moe-expert-store {directory}: MoE layer {layer} expert {expert} tensor "
                                           f"{name} is {str(t.dtype).removeprefix('torch.')}, which the store cannot "
                                           f"hold ({', '.join(_DTYPES)}); convert the weights first")
                specs, nbytes = _layout(tensors)
                if len(pending) > fill_threads:
                    finish_one()  # at most fill_threads + 1 record buffers exist
                slot = writer.buffer(specs, nbytes)
                entry = {"layer": int(layer), "expert": int(expert), "offset": pos, "nbytes": nbytes,
                         "checksum": None,
                         "tensors": [{"name": s.name, "shape": list(s.shape),
                                      "dtype": str(s.dtype).removeprefix("torch."), "offset": s.offset}
                                     for s in specs]}
                if pool is not None:  # filled (read), hashed and written on a thread, several records in flight
                    pending.append((slot, pool.submit(job, tensors, specs, nbytes, slot[1], pos), entry))
                else:
                    done = Future()
                    done.set_result(job(tensors, specs, nbytes, slot[1], pos))
                    pending.append((slot, done, entry))
                entries.append(entry)
                pos += nbytes
            while pending:
                finish_one()
        finally:
            if pool is not None:
                for _, fut, _ in pending:
                    fut.cancel()
                pool.shutdown(wait=True)
            writer.close(sync=True)
        manifest = {"format": FORMAT, "version": VERSION, "source": source, "checkpoint": checkpoint,
                    "data_file": DATA_FILE,
                    "data_bytes": pos, "record_bytes": max((e["nbytes"] for e in entries), default=0),
                    "records": entries}
        with open(tmp_man, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_data, data_path)
        os.replace(tmp_man, man_path)
        _fsync_dir(directory)
    except BaseException as e:
        for p in (tmp_data, tmp_man):
            if os.path.exists(p):
                os.remove(p)
        if not isinstance(e, OSError):
            raise  # a refused record (dtype, a bad source tensor): nothing partial is left either
        what = "the disk is full" if e.errno == 28 else (e.strerror or str(e))
        raise OffloadError(f"--moe-expert-store {directory}: writing the expert store failed ({what}); "
                           f"free space or choose another directory") from None
    return ExpertStore.open(directory)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ExpertStore:
    """An opened store: its records by (layer, expert) and positioned reads through an aio handle.

    Args:
        directory: the --moe-expert-store holding manifest.json and experts.bin.
        manifest: the parsed manifest (use ExpertStore.open).
    """

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self.data_path = os.path.join(directory, manifest["data_file"])
        self.source = manifest.get("source") or {}
        self.records: Dict[Tuple[int, int], Record] = {}
        for e in manifest["records"]:
            specs = tuple(TensorSpec(t["name"], tuple(t["shape"]), _DTYPES[t["dtype"]], t["offset"])
                          for t in e["tensors"])
            self.records[(e["layer"], e["expert"])] = Record(e["layer"], e["expert"], e["offset"], e["nbytes"],
                                                             e["checksum"], specs)
        self.record_bytes = int(manifest["record_bytes"])
        self.mutable = bool(manifest.get("mutable", False))  # a training store: records rewritten in place
        self.checksums: Dict[Tuple[int, int], int] = {k: r.checksum for k, r in self.records.items()}

    @classmethod
    def open(cls, directory: str, expected_source: Optional[dict] = None) -> "ExpertStore":
        """Opens and checks a store; raises OffloadError (one line naming the file) when it is unusable.

        Refused: a missing or unreadable manifest, one of another format or version (foreign), one whose
        `source` differs from `expected_source` (stale: written from another checkpoint), a data file whose
        size is not what the manifest says (truncated), or records outside the file.
        """
        man_path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(man_path):
            raise OffloadError(f"{man_path}: no expert-store manifest; write one with tools/offload_experts.py")
        try:
            with open(man_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise OffloadError(f"{man_path}: unreadable manifest ({type(e).__name__}); rewrite the store with "
                               f"tools/offload_experts.py") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise OffloadError(f"{man_path}: not a megatron-moe expert store (format "
                               f"{manifest.get('format') if isinstance(manifest, dict) else None!r}); point "
                               f"--moe-expert-store at an empty directory or one written by tools/offload_experts.py")
        if manifest.get("version") != VERSION:
            raise OffloadError(f"{man_path}: store version {manifest.get('version')} is not {VERSION}; rewrite it "
                               f"with tools/offload_experts.py")
        if expected_source is not None and manifest.get("source") != expected_source:
            raise OffloadError(f"{man_path}: stale expert store, written from {manifest.get('checkpoint')} "
                               f"({_describe(manifest.get('source'))}), not this checkpoint "
                               f"({_describe(expected_source)}); "
                               f"rewrite it with tools/offload_experts.py or use another --moe-expert-store")
        store = cls(directory, manifest)
        size = os.path.getsize(store.data_path) if os.path.isfile(store.data_path) else None
        if size is None:
            raise OffloadError(f"{store.data_path}: the expert store's data file is missing; rewrite the store "
                               f"with tools/offload_experts.py")
        if size != manifest["data_bytes"] or any(r.offset + r.nbytes > size for r in store.records.values()):
            raise OffloadError(f"{store.data_path}: truncated expert store ({size} bytes, the manifest says "
                               f"{manifest['data_bytes']}); rewrite it with tools/offload_experts.py")
        return store

    def keys(self) -> List[Tuple[int, int]]:
        return sorted(self.records)

    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.records.values())

    def read_into(self, handle, key: Tuple[int, int], buffer_u8: torch.Tensor, verify: bool = True) -> Record:
        """Reads record `key` into the first record.nbytes bytes of `buffer_u8` (CPU uint8, ideally locked).

        Runs on a reader thread: the aio handle releases the GIL while the bytes move. Raises OffloadError
        naming the file on an I/O error or, with `verify`, a checksum mismatch (a corrupted record).
        """
        rec = self.records[key]
        view = buffer_u8[:rec.nbytes]
        fix = ("resume from the last checkpoint with --load" if self.mutable
               else "rewrite the store with tools/offload_experts.py")
        try:
            handle.sync_pread(view, self.data_path, rec.offset)
        except (OSError, EOFError) as e:
            raise OffloadError(f"{self.data_path}: reading the record of MoE layer {key[0]} expert {key[1]} "
                               f"(offset {rec.offset}, {rec.nbytes} bytes) failed ({e}); {fix}") from None
        if verify and self.checksums[key] is not None and checksum(view) != self.checksums[key]:
            raise OffloadError(f"{self.data_path}: checksum mismatch in the record of MoE layer {key[0]} expert "
                               f"{key[1]} (offset {rec.offset}); the store is corrupted, {fix}")
        return rec

    def write_from(self, handle, key: Tuple[int, int], buffer_u8: torch.Tensor, verify: bool = True) -> Record:
        """Writes record `key` from the first record.nbytes bytes of `buffer_u8` (a mutable store's records only).

        Runs on a writer thread (the aio handle releases the GIL). With `verify`, the record's xxh3 is kept so the
        next read_into checks it. Raises OffloadError naming the file on an I/O error (the record's content is
        then unknown: reading it fails until it is written again). Fault point for tests: MOE_OFFLOAD_FAULT=write:N
        makes this process's N-th record write fail as the handle would (EIO).
        """
        assert self.mutable, "write_from on a store written from a checkpoint (read-only)"
        rec = self.records[key]
        view = buffer_u8[:rec.nbytes]
        digest = checksum(view) if verify else None  # hashed before the bytes go: what the next read must find
        self.checksums[key] = -1  # unknown until the write completes
        try:
            _fault_point()
            handle.sync_pwrite(view, self.data_path, rec.offset)
        except OSError as e:
            what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise OffloadError(f"{self.data_path}: writing the optimizer state of MoE layer {key[0]} expert {key[1]} "
                               f"(offset {rec.offset}, {rec.nbytes} bytes) failed ({what}); the offload files are "
                               f"now inconsistent: resume from the last checkpoint with --load") from None
        self.checksums[key] = digest  # None without verify: reads of this store then skip the check
        return rec


def _describe(source) -> str:
    if not isinstance(source, dict):
        return repr(source)
    return ", ".join(f"{k} {source[k]}" for k in ("iteration", "fingerprint") if k in source) or repr(source)


# ------------------------------------------------------------------------------------------ training stores
FAULT_ENV = "MOE_OFFLOAD_FAULT"  # "write:N": this process's N-th record write fails (EIO), for fault tests
_fault_writes = 0


def _fault_point() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    global _fault_writes
    _fault_writes += 1
    if spec == f"write:{_fault_writes}":
        raise OSError(errno.EIO, f"injected I/O error ({FAULT_ENV}={spec})")


TensorLayout = Mapping[str, Tuple[Tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)


def create_store(directory: str, layout: Iterable[Tuple[int, int, TensorLayout]], source: dict) -> ExpertStore:
    """A mutable store (training: Adam state swapped in and out) in `directory`, every record zero.

    The data file is created afresh and its bytes reserved up front (posix_fallocate), so a disk too small is
    found here, before training starts, and never in the middle of a write-back; reserved bytes read as zeros,
    which is the optimizer's initial state. Records carry no checksum in the manifest (they change every step):
    the store keeps the xxh3 of what it last wrote in memory and checks each read against it.
    Raises OffloadError naming the directory on an unwritable directory or a full disk (nothing is left behind).
    """
    entries, pos = [], 0
    for layer, expert, tensors in layout:
        specs, nbytes = _layout({n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype)
                                 in tensors.items()})
        entries.append({"layer": int(layer), "expert": int(expert), "offset": pos, "nbytes": nbytes,
                        "checksum": None,
                        "tensors": [{"name": s.name, "shape": list(s.shape),
                                     "dtype": str(s.dtype).removeprefix("torch."), "offset": s.offset}
                                    for s in specs]})
        pos += nbytes
    manifest = {"format": FORMAT, "version": VERSION, "mutable": True, "source": source, "checkpoint": None,
                "data_file": DATA_FILE, "data_bytes": pos,
                "record_bytes": max((e["nbytes"] for e in entries), default=0), "records": entries}
    data_path, man_path = os.path.join(directory, DATA_FILE), os.path.join(directory, MANIFEST)
    try:
        for p in (man_path, data_path):
            if os.path.exists(p):
                os.remove(p)
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if pos:
                os.posix_fallocate(fd, 0, pos)
        finally:
            os.close(fd)
        tmp = man_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, man_path)
        _fsync_dir(directory)
    except OSError as e:
        for p in (data_path, man_path, man_path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)
        what = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OffloadError(f"--moe-offload-dir {directory}: reserving {pos} bytes of optimizer state failed ({what}); "
                           f"free space or choose another directory") from None
    store = ExpertStore(directory, manifest)
    zeros: Dict[int, int] = {}
    for key, rec in store.records.items():
        if rec.nbytes not in zeros:
            zeros[rec.nbytes] = checksum(torch.zeros(rec.nbytes, dtype=torch.uint8))
        store.checksums[key] = zeros[rec.nbytes]
    return store


def open_training_store(directory: str, rank: int, layout: Iterable[Tuple[int, int, TensorLayout]],
                        source: dict) -> Tuple[ExpertStore, object]:
    """(a fresh mutable store for this rank in DIR/rank_XXXXX, the open lock file that must stay open).

    `directory` must be missing, empty, or hold only rank_XXXXX stores this run may reuse (and a filesystem's
    lost+found): a store whose manifest
    records another `source` (a run with another model, world size or expert layout), an inference expert store,
    or any other file is refused with one line naming the path; so is a store locked by a running process.
    A reused store's contents are discarded (training fills it from --load, or starts from zeros).
    """
    sub = os.path.join(directory, f"rank_{rank:05d}")
    try:
        os.makedirs(sub, exist_ok=True)
    except OSError as e:
        raise OffloadError(f"--moe-offload-dir {directory}: cannot create {sub} ({e.strerror}); choose a writable "
                           f"directory") from None
    if not os.access(sub, os.W_OK):
        raise OffloadError(f"--moe-offload-dir {sub}: not writable; choose a writable directory")
    # lost+found: a filesystem's own folder, there when --moe-offload-dir is a mount point (DeepSpeed's nvme_path is
    # usually the NVMe mount itself)
    others = sorted(n for n in os.listdir(directory) if not re.fullmatch(r"rank_\d{5}", n) and n != "lost+found")
    if others:
        kind = "an inference expert store" if MANIFEST in others else f"other files ({', '.join(others[:3])})"
        raise OffloadError(f"--moe-offload-dir {directory}: holds {kind}, not optimizer state of this run; point it "
                           f"at an empty directory")
    try:
        lock = open(os.path.join(sub, "lock"), "w")
    except OSError as e:
        raise OffloadError(f"--moe-offload-dir {sub}: cannot write in it ({e.strerror}); choose a writable "
                           f"directory") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise OffloadError(f"--moe-offload-dir {sub}: in use by another running process; give each run its own "
                           f"directory") from None
    man_path = os.path.join(sub, MANIFEST)
    if os.path.exists(man_path):
        try:
            with open(man_path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("format") != FORMAT or not old.get("mutable"):
            lock.close()
            raise OffloadError(f"{man_path}: not optimizer state of a megatron-moe run; point --moe-offload-dir at "
                               f"an empty directory")
        if old.get("source") != source:
            lock.close()
            prev = old.get("source") if isinstance(old.get("source"), dict) else {}
            short = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."  # noqa: E731
            diff = [f"{k} {short(prev.get(k))} here vs {short(source.get(k))} now"
                    for k in sorted(set(prev) | set(source)) if prev.get(k) != source.get(k)]
            raise OffloadError(f"{man_path}: left by another run ({'; '.join(diff[:3])}); delete it or point "
                               f"--moe-offload-dir at an empty directory")
    try:
        store = create_store(sub, layout, source)
    except BaseException:
        lock.close()
        raise
    return store, lock
