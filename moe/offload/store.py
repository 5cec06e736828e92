"""The expert store on disk: one 4 KiB-aligned record per (MoE layer, global expert) in one data file, and a
manifest (shapes, dtypes, offsets, a checksum per record) that says what the file holds.

The store knows files and records, not layers or models. Reads go through the project's aio handle with
O_DIRECT into caller-owned (page-locked) buffers, so they never touch the page cache; writes are atomic
(temporary file, fsync, rename: a store is either complete or absent, a full disk leaves nothing behind).

    DIR/manifest.json   {"format": FORMAT, "version": VERSION, "source": {...}, "data_file": "experts.bin",
                         "data_bytes": n, "record_bytes": max record size, "records": [...]}
    DIR/experts.bin     records at multiples of ALIGN; each holds its tensors at multiples of TENSOR_ALIGN
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

FORMAT = "megatron-moe-expert-store"
VERSION = 1
ALIGN = 4096  # record alignment: O_DIRECT reads whole, aligned blocks
TENSOR_ALIGN = 64  # tensor alignment inside a record (cache lines; any dtype view)
MANIFEST = "manifest.json"
DATA_FILE = "experts.bin"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


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


def pack_record(tensors: Mapping[str, torch.Tensor], specs: Tuple[TensorSpec, ...], nbytes: int) -> torch.Tensor:
    """The record's bytes as a 1-D uint8 tensor (zero padding between tensors)."""
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    for spec in specs:
        src = tensors[spec.name].detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        buf[spec.offset:spec.offset + spec.nbytes].copy_(src)
    return buf


def tensor_views(buffer_u8: torch.Tensor, record: Record) -> Dict[str, torch.Tensor]:
    """{name: view} of a record held in `buffer_u8` (1-D uint8, at least record.nbytes, any device)."""
    out = {}
    for spec in record.tensors:
        out[spec.name] = buffer_u8[spec.offset:spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)
    return out


def write_store(directory: str, records: Iterable[Tuple[int, int, Mapping[str, torch.Tensor]]],
                source: dict, checkpoint: Optional[str] = None) -> "ExpertStore":
    """Writes every (layer, expert, {name: tensor}) record and the manifest into `directory` atomically.

    `source` identifies what the records were made from (checked by ExpertStore.open(expected_source=...));
    `checkpoint` (the path they came from) is recorded for messages only.
    Raises OffloadError naming the file on an unwritable directory or a full disk; nothing partial remains.
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OffloadError(f"--moe-offload-dir {directory}: cannot create it ({e.strerror})") from None
    data_path, tmp_data = os.path.join(directory, DATA_FILE), os.path.join(directory, DATA_FILE + ".tmp")
    man_path, tmp_man = os.path.join(directory, MANIFEST), os.path.join(directory, MANIFEST + ".tmp")
    entries: List[dict] = []
    pos = 0
    try:
        with open(tmp_data, "wb") as f:
            for layer, expert, tensors in records:
                specs, nbytes = _layout(tensors)
                buf = pack_record(tensors, specs, nbytes)
                f.write(memoryview(buf.numpy()))
                entries.append({"layer": int(layer), "expert": int(expert), "offset": pos, "nbytes": nbytes,
                                "checksum": checksum(buf),
                                "tensors": [{"name": s.name, "shape": list(s.shape),
                                             "dtype": str(s.dtype).removeprefix("torch."), "offset": s.offset}
                                            for s in specs]})
                pos += nbytes
            f.flush()
            os.fsync(f.fileno())
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
    except OSError as e:
        for p in (tmp_data, tmp_man):
            if os.path.exists(p):
                os.remove(p)
        what = "the disk is full" if e.errno == 28 else (e.strerror or str(e))
        raise OffloadError(f"--moe-offload-dir {directory}: writing the expert store failed ({what}); "
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
        directory: the --moe-offload-dir holding manifest.json and experts.bin.
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
                               f"--moe-offload-dir at an empty directory or one written by tools/offload_experts.py")
        if manifest.get("version") != VERSION:
            raise OffloadError(f"{man_path}: store version {manifest.get('version')} is not {VERSION}; rewrite it "
                               f"with tools/offload_experts.py")
        if expected_source is not None and manifest.get("source") != expected_source:
            raise OffloadError(f"{man_path}: stale expert store, written from {manifest.get('checkpoint')} "
                               f"({_describe(manifest.get('source'))}), not this checkpoint "
                               f"({_describe(expected_source)}); "
                               f"rewrite it with tools/offload_experts.py or use another --moe-offload-dir")
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
        try:
            handle.sync_pread(view, self.data_path, rec.offset)
        except (OSError, EOFError) as e:
            raise OffloadError(f"{self.data_path}: reading the record of MoE layer {key[0]} expert {key[1]} "
                               f"(offset {rec.offset}, {rec.nbytes} bytes) failed ({e}); rewrite the store "
                               f"with tools/offload_experts.py") from None
        if verify and checksum(view) != rec.checksum:
            raise OffloadError(f"{self.data_path}: checksum mismatch in the record of MoE layer {key[0]} expert "
                               f"{key[1]} (offset {rec.offset}); the store is corrupted, rewrite it with "
                               f"tools/offload_experts.py")
        return rec


def _describe(source) -> str:
    if not isinstance(source, dict):
        return repr(source)
    return ", ".join(f"{k} {source[k]}" for k in ("iteration", "fingerprint") if k in source) or repr(source)
