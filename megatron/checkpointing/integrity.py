"""Integrity of a checkpoint's files: atomic writes hashed on their way to disk, checksums.json written last, and
reads verified against it before anything is unpickled."""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional

import torch

from megatron.checkpointing.faults import fault_point
from megatron.checkpointing.layout import MANIFEST, CorruptCheckpointError, dense_path, log_rank0
from megatron.errors import CheckpointError

_MANIFEST_FORMAT = "megatron-moe checkpoint checksums v1"


class _HashingWriter:
    """The file object torch.save writes through: each chunk is hashed (xxh3-64) and counted on its way to disk, so
    the checksum costs no second read."""

    def __init__(self, f, after_write=None):
        import xxhash

        self.f, self.hash, self.bytes = f, xxhash.xxh3_64(), 0
        self.after_write = after_write  # called after each chunk (megatron/hf: drops a file-backed model's pages)
        self.error: Optional[OSError] = None  # torch.save reports a failed write as a RuntimeError; this is why

    def write(self, chunk) -> int:
        self.hash.update(chunk)
        try:
            n = self.f.write(chunk)
        except OSError as e:
            self.error = e
            raise
        self.bytes += n
        if self.after_write is not None:
            self.after_write()
        return n

    def flush(self) -> None:
        self.f.flush()


def _no_zip_crc32():
    """torch.save without the zip format's CRC32 of each record: torch.load never checks it, and our xxh3-64 of the
    whole file (computed on the way, verified before every load) covers the same bytes; the CRC costs ~0.3 s/GB
    (measured: 0.65 s of a 2.2 s save of 860 MB). `unzip -t` reports the missing CRCs; torch.load does not care."""
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})


def atomic_torch_save(obj, path: str, sync: bool = True, after_write=None) -> dict:
    """Writes `obj` to `path` (tmp file, fsync, rename); returns its manifest entry {"bytes", "xxh3_64"}. Without
    `sync` the fsync is left to the caller (fsync_files: one pass over every file of a save). `after_write()` runs
    after each chunk torch.save writes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        w = _HashingWriter(f, after_write)
        try:
            with _no_zip_crc32():
                torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:  # e.g. ENOSPC: the caller reports a failed write, not an internal error
                raise w.error from None
            raise
        fault_point("write", f)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": w.bytes, "xxh3_64": w.hash.hexdigest()}


def fsync_files(paths) -> None:
    """fsync of every file, from a few threads at once: the file system commits concurrent fsyncs together (ext4 and
    xfs group their journal commits), where one at a time each waits for its own commit (measured on the shared
    machine: 134 sequential fsyncs of a 860 MB checkpoint took 1.3 s). fsync releases the GIL."""
    def one(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    paths = list(paths)
    if len(paths) <= 1:
        for path in paths:
            one(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(paths)), thread_name_prefix="fsync") as pool:
        list(pool.map(one, paths))  # re-raises the first OSError


def _manifest_digest(files: dict) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(json.dumps(files, sort_keys=True).encode())


def write_manifest(ckpt_dir: str, iteration: int, files: Dict[str, dict]) -> None:
    """checksums.json: every file of the checkpoint (all ranks'), with a digest of the list itself."""
    body = {"format": _MANIFEST_FORMAT, "algorithm": "xxh3_64", "iteration": iteration, "files": files,
            "digest": _manifest_digest(files)}
    tmp = os.path.join(ckpt_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, sort_keys=True, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, MANIFEST))


def write_manifest_of(ckpt_dir: str, iteration: int) -> None:
    """checksums.json for a checkpoint directory written by other means (tools/checkpoint_tp.py): every file hashed."""
    import xxhash

    files = {}
    for dirpath, _, names in os.walk(ckpt_dir):
        for name in names:
            if name != MANIFEST:
                h, n = xxhash.xxh3_64(), 0
                with open(os.path.join(dirpath, name), "rb") as f:
                    for chunk in iter(lambda: f.read(64 * 2 ** 20), b""):  # a file of GBs is never held whole
                        h.update(chunk)
                        n += len(chunk)
                files[os.path.relpath(os.path.join(dirpath, name), ckpt_dir)] = {"bytes": n, "xxh3_64": h.hexdigest()}
    write_manifest(ckpt_dir, iteration, files)


@functools.lru_cache(maxsize=None)
def _say_unverified(ckpt_dir: str) -> None:
    log_rank0(f"checkpoint {ckpt_dir} has no {MANIFEST} (written before checksums existed): its files are loaded "
              f"without verification")


@functools.lru_cache(maxsize=16)
def _read_manifest_file(path: str, mtime_ns: int, size: int) -> Dict[str, dict]:
    del mtime_ns, size  # the cache key: a rewritten manifest is read again
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read().decode("utf-8"))
        files = body["files"]
        ok = (body.get("format") == _MANIFEST_FORMAT and isinstance(files, dict)
              and body.get("digest") == _manifest_digest(files)
              and all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("xxh3_64"), str)
                      for e in files.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CorruptCheckpointError(f"{path}: the checksum list is unreadable or does not match its own digest; "
                                     f"the checkpoint is torn or corrupted")
    return files


def read_manifest(ckpt_dir: str) -> Optional[Dict[str, dict]]:
    """{relative path: {"bytes", "xxh3_64"}} of a checkpoint directory; None for a checkpoint written before
    checksums existed (said once in the log)."""
    path = os.path.join(ckpt_dir, MANIFEST)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _say_unverified(os.path.abspath(ckpt_dir))
        return None
    return _read_manifest_file(path, st.st_mtime_ns, st.st_size)


def load_checkpoint_file(ckpt_dir: str, path: str, mmap: bool = False):
    """torch.load of one checkpoint file, after checking its size and xxh3-64 against the directory's checksums.json.
    Missing, truncated or changed: CorruptCheckpointError.

    The file is hashed through a read-only memory map (the disk read), then loaded from the page cache. With `mmap`
    (expert files, whose tensors are always copied where they are installed: into the parameters, the stacked Adam
    state, the offload store) torch.load maps those same pages instead of copying them into new storages. A file
    rewritten in place between the check and the load would not be caught; no writer of checkpoints does that
    (every file is written under a temporary name and renamed), and damage at rest is what the checksum is for."""
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"checkpoint file {path} is missing; the checkpoint is torn or corrupted")
    files = read_manifest(ckpt_dir)
    if files is not None:
        entry = files.get(os.path.relpath(path, ckpt_dir))
        if entry is None:
            raise CorruptCheckpointError(f"checkpoint file {path} is not listed in {os.path.join(ckpt_dir, MANIFEST)}"
                                         f"; the checkpoint is torn or corrupted")
        _verify(path, entry)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and files is not None)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is an unreadable checkpoint
        raise CorruptCheckpointError(f"checkpoint file {path} is unreadable ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _verify(path: str, entry: dict) -> None:
    """The file's size and xxh3-64 against its manifest entry: one sequential pass, 64 MB at a time into one buffer
    (not a memory map of the whole file: the pages a mapping has touched count in the process's peak RSS, a file of
    GBs as a whole)."""
    import xxhash

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry["bytes"]:
            raise CorruptCheckpointError(f"checkpoint file {path} has {'fewer' if size < entry['bytes'] else 'more'}"
                                         f" bytes than recorded ({size if size < entry['bytes'] else 'more'}"
                                         f" vs {entry['bytes']}); the checkpoint is torn or corrupted")
        h, buf = xxhash.xxh3_64(), memoryview(bytearray(min(size, 64 * 2 ** 20)))
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(buf[:n])
        digest = h.hexdigest()
    if digest != entry["xxh3_64"]:
        raise CorruptCheckpointError(f"checkpoint file {path} does not match its checksum in {MANIFEST}; the "
                                     f"checkpoint is torn or corrupted")


def checkpoint_complete(ckpt_dir: str) -> bool:
    """A cheap check (no reading of the tensors): checksums.json is readable and every file it lists is present
    with its recorded size. A directory from before checksums existed counts as complete when it has a dense file."""
    try:
        files = read_manifest(ckpt_dir)
    except CheckpointError:
        return False
    if files is None:
        return os.path.isfile(dense_path(ckpt_dir))
    try:
        return all(os.path.getsize(os.path.join(ckpt_dir, rel)) == e["bytes"] for rel, e in files.items())
    except OSError:
        return False
