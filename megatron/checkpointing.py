"""Megatron-layout checkpoints: atomic save/load of dense state per TP rank and one file per (MoE layer, expert).

Layout (DESIGN.md §5):
    SAVE/latest_checkpointed_iteration.txt
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt            dense model + optimizer + scheduler + RNG + counters
    SAVE/iter_0000100/layer_{L}_expert_{E}_mp_rank_00_model_states.pt   expert E of MoE layer L (+ its Adam state)
    SAVE/iter_0000100/checksums.json                           size and xxh3-64 of every file above, written last
Expert files are indexed by *global* expert id, so a checkpoint written at one EP size loads at another.
Every file is checked against checksums.json before it is unpickled; a torn or corrupted checkpoint is refused
(or, with --load-fallback, the newest older one that verifies is loaded instead).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import random
import re
import shutil
import signal
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from moe.experts import is_expert_param
from moe.layer import MoELayer

from megatron.errors import CheckpointError  # noqa: F401 - re-exported (callers import it from here)

TRACKER = "latest_checkpointed_iteration.txt"
DENSE_FILE = "model_optim_rng.pt"
MANIFEST = "checksums.json"  # {relative path: {"bytes", "xxh3_64"}} of every file of the iteration directory
_MANIFEST_FORMAT = "megatron-moe checkpoint checksums v1"
_ITER_DIR_RE = re.compile(r"iter_(\d{7})")

log = logging.getLogger("megatron.checkpointing")


class CorruptCheckpointError(CheckpointError):
    """A torn or corrupted checkpoint: a file (or the tracker, or checksums.json) that is missing, truncated,
    unreadable or different from its recorded checksum. --load-fallback may skip such a checkpoint."""


def _log_rank0(msg: str) -> None:
    if not (dist.is_initialized() and dist.get_rank() != 0):
        log.info(msg)


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def dense_path(ckpt_dir: str, tp_rank: int = 0) -> str:
    return os.path.join(ckpt_dir, f"mp_rank_{tp_rank:02d}", DENSE_FILE)


def expert_path(ckpt_dir: str, moe_layer: int, expert_id: int, tp_rank: int = 0) -> str:
    return os.path.join(ckpt_dir, f"layer_{moe_layer}_expert_{expert_id}_mp_rank_{tp_rank:02d}_model_states.pt")


# ----------------------------------------------------------------------------------------------- experts
def _moe_layers(model: torch.nn.Module):
    """(moe_layer_index, module_prefix, layer) for every MoE layer, in model order."""
    layers = [(mod.layer_index, name, mod) for name, mod in model.named_modules() if isinstance(mod, MoELayer)]
    for index, name, _ in layers:
        if index is None:
            raise CheckpointError(f"MoE layer {name} has no layer_index, so its experts cannot be named in a "
                                  f"checkpoint (they would be lost); set `{name}.layer_index` to its position among "
                                  f"the model's MoE layers (GPTModel sets it)")
    return layers


def _expert_param_names(model: torch.nn.Module, prefix: str) -> List[str]:
    return [n for n, p in model.named_parameters() if n.startswith(prefix + ".") and is_expert_param(p)]


def is_expert_param_name(model: torch.nn.Module) -> Dict[str, bool]:
    return {n: is_expert_param(p) for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict:
    st = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return _to_plain(st)


def set_rng_state(st: dict) -> None:
    r = st["random"]
    random.setstate((r[0], tuple(r[1]), r[2]))
    n = st["np"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _to_plain(obj):
    """Turns numpy/tuple state into types torch.load(weights_only=True) accepts."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------------------------- save
FAULT_ENV = "MEGATRON_FAULT_INJECT"  # tools/fault_inject.py: "write:N" or "tracker" (see _fault_point)
_fault_writes = 0


def _fault_point(where: str, f=None) -> None:
    """Crash-consistency testing only (tools/fault_inject.py); unset, it does nothing. MEGATRON_FAULT_INJECT=write:N:
    this process SIGKILLs itself during its N-th checkpoint file write, leaving half the bytes on disk (a torn
    file); =tracker: between writing the new tracker and renaming it over the old one."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    global _fault_writes
    if where == "write":
        _fault_writes += 1
        if spec != f"write:{_fault_writes}":
            return
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
    if where == "write" or spec == where:
        os.kill(os.getpid(), signal.SIGKILL)


class _HashingWriter:
    """The file object torch.save writes through: each chunk is hashed (xxh3-64) and counted on its way to disk, so
    the checksum costs no second read."""

    def __init__(self, f):
        import xxhash

        self.f, self.hash, self.bytes = f, xxhash.xxh3_64(), 0
        self.error: Optional[OSError] = None  # torch.save reports a failed write as a RuntimeError; this is why

    def write(self, chunk) -> int:
        self.hash.update(chunk)
        try:
            n = self.f.write(chunk)
        except OSError as e:
            self.error = e
            raise
        self.bytes += n
        return n

    def flush(self) -> None:
        self.f.flush()


def _atomic_torch_save(obj, path: str) -> dict:
    """Writes `obj` to `path` (tmp file, fsync, rename); returns its manifest entry {"bytes", "xxh3_64"}."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:  # e.g. ENOSPC: the caller reports a failed write, not an internal error
                raise w.error from None
            raise
        _fault_point("write", f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": w.bytes, "xxh3_64": w.hash.hexdigest()}


def _manifest_digest(files: dict) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(json.dumps(files, sort_keys=True).encode())


def write_manifest_of(ckpt_dir: str, iteration: int) -> None:
    """checksums.json for a checkpoint directory written by other means (tools/checkpoint_tp.py): every file hashed."""
    import xxhash

    files = {}
    for dirpath, _, names in os.walk(ckpt_dir):
        for name in names:
            if name != MANIFEST:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
                files[os.path.relpath(os.path.join(dirpath, name), ckpt_dir)] = {
                    "bytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    _write_manifest(ckpt_dir, iteration, files)


def _write_manifest(ckpt_dir: str, iteration: int, files: Dict[str, dict]) -> None:
    """checksums.json: every file of the checkpoint (all ranks'), with a digest of the list itself."""
    body = {"format": _MANIFEST_FORMAT, "algorithm": "xxh3_64", "iteration": iteration, "files": files,
            "digest": _manifest_digest(files)}
    tmp = os.path.join(ckpt_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, sort_keys=True, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, MANIFEST))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named_optimizer_state(model, optimizer) -> Dict[str, dict]:
    """Adam state keyed by parameter name (index-free, so it survives resharding). A ZeRO optimizer's shards are
    gathered first (collective: every rank calls this), so checkpoints look the same with or without ZeRO."""
    return optimizer.state_dict()


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, loss_scaler, counters: dict,
                    configs: dict, groups=None) -> str:
    """Writes iter_{iteration} atomically (tmp dir, fsync, rename, then the tracker by rename).

    Dense state is written by DP rank 0 of each TP rank; each expert file by expert-DP rank 0 of the EP
    group that owns it. All ranks call this (collective barriers when distributed).
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    _moe_layers(model)  # refuses, before anything is written, experts it could not name (no silent loss)
    final = iter_dir(root, iteration)
    tmp = os.path.join(root, f".tmp_iter_{iteration:07d}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if distributed:
        dist.barrier()
    try:
        files = _write_files(tmp, iteration, model, optimizer, scheduler, loss_scaler, counters, configs, groups)
        failure = None
    except OSError as e:  # a full disk, a vanished mount, ...: nothing of this save may remain
        files, failure = {}, e
    except BaseException:  # an internal error: no partial directory either, and the traceback goes on
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    # every rank's (failure, files written): one collective in place of the barrier, so no rank waits forever
    failed, files = _gather_files(failure is not None, files, distributed)
    if not failed and rank == 0:
        try:
            _write_manifest(tmp, iteration, files)  # last, so a directory with checksums.json is complete
        except OSError as e:
            failure = e
    if failed or _any_rank_failed(failure is not None, model, distributed):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = read_tracker_or_none(root)
        what = (("the disk is full" if failure.errno == 28 else failure.strerror or str(failure))
                if failure is not None else "another rank failed to write its files")
        raise CheckpointError(f"--save {root}: writing the checkpoint of iteration {iteration} failed ({what}); "
                              f"nothing of it was kept, and the previous checkpoint "
                              f"({'iteration ' + str(previous) if previous is not None else 'none'}) is intact: "
                              f"free space or point --save elsewhere, then resume with --load") from None
    if rank == 0:
        for dirpath, _, _ in os.walk(tmp):
            _fsync_dir(dirpath)
        old = None
        if os.path.exists(final):  # re-saving the same iteration: keep the old one until the new is in place
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        write_tracker(root, iteration)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


def write_tracker(root: str, iteration: int) -> None:
    """Replaces the tracker atomically (tmp file, fsync, rename, fsync of the directory)."""
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    _fault_point("tracker")
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _fsync_dir(root)


def _gather_files(failed: bool, files: Dict[str, dict], distributed: bool) -> Tuple[bool, Dict[str, dict]]:
    """(whether any rank failed, the union of every rank's written files) on every rank."""
    if not distributed:
        return failed, files
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (failed, files))
    return any(f for f, _ in out), {k: v for _, fs in out for k, v in sorted(fs.items())}


def _any_rank_failed(failed: bool, model, distributed: bool) -> bool:
    """Whether any rank's write failed (an all-reduce in place of the barrier, so no rank waits forever)."""
    if not distributed:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=next(model.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _write_files(tmp: str, iteration: int, model, optimizer, scheduler, loss_scaler, counters: dict, configs: dict,
                 groups) -> Dict[str, dict]:
    """This rank's share of a checkpoint, into the temporary directory `tmp`; returns {relative path: entry}."""
    files = {}
    is_expert = is_expert_param_name(model)
    opt_state = _named_optimizer_state(model, optimizer) if optimizer is not None else {}
    dp_rank = groups.dp_rank if groups is not None else 0
    tp = _model_tp_rank(model)
    if dp_rank == 0 and getattr(groups, "cp_rank", 0) == 0:  # CP ranks hold identical replicas: one writes
        sd = {k: v for k, v in model.state_dict().items() if not is_expert.get(k, False)}
        rng = get_rng_state()
        tracker = getattr(model, "rng_tracker", None)
        if tracker is not None:  # the per-TP-rank dropout stream (megatron/tensor_parallel/random.py)
            rng["tensor_parallel"] = tracker.state_dict()
        payload = {
            "iteration": iteration,
            "model": sd,
            "optimizer": {k: v for k, v in opt_state.items() if not is_expert.get(k, False)},
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "loss_scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
            "rng": rng,
            "counters": dict(counters),
            "configs": configs,
            "checkpoint_version": 1,
        }
        files[os.path.relpath(dense_path(tmp, tp), tmp)] = _atomic_torch_save(payload, dense_path(tmp, tp))
    files.update(_save_experts(tmp, model, opt_state, groups, optimizer))
    return files


def _model_tp_rank(model) -> int:
    """The tensor-parallel rank the model was built for (0 without tensor parallelism)."""
    group = getattr(model, "tp_group", None)
    return 0 if group is None else dist.get_rank(group)


def _save_experts(ckpt_dir: str, model, opt_state: dict, groups, optimizer=None) -> Dict[str, dict]:
    # Experts are replicated over tensor parallelism (not sharded), so TP rank 0 writes the one file per
    # (MoE layer, global expert) that DESIGN §5 specifies, named ..._mp_rank_00_..., and every TP rank reads it.
    files = {}
    if _model_tp_rank(model) != 0 or getattr(groups, "cp_rank", 0) != 0:  # experts are replicated over CP too
        return files
    for moe_idx, prefix, layer in _moe_layers(model):
        # one replica of each expert writes its file: rank 0 of the expert-data-parallel group of this EP size
        edp_group = groups.expert_dp_group(layer.ep_size) if groups is not None else None
        if edp_group is not None and dist.get_rank(edp_group) != 0:
            continue
        names = _expert_param_names(model, prefix)
        params = dict(model.named_parameters())
        e = layer.num_local_experts
        for i in range(e):
            gid = layer.ep_rank * e + i
            weights = {n[len(prefix) + 1:]: params[n].detach()[i].clone() for n in names}
            optim = optimizer.expert_state(moe_idx, gid) if optimizer is not None else {}  # {} unless offloaded
            for n in names:
                if n in opt_state:
                    optim[n[len(prefix) + 1:]] = {k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                                                  for k, v in opt_state[n].items()}
            path = expert_path(ckpt_dir, moe_idx, gid)
            files[os.path.relpath(path, ckpt_dir)] = _atomic_torch_save(
                {"moe_layer": moe_idx, "expert_id": gid, "num_experts": e * layer.ep_size, "model": weights,
                 "optimizer": optim}, path)
    return files


# ----------------------------------------------------------------------------------------------- load
def read_tracker(root: str) -> Optional[int]:
    """The iteration the tracker names; None without a tracker; CorruptCheckpointError when it holds no number."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    text = raw.decode("ascii", errors="replace").strip()
    if not re.fullmatch(r"\d+", text):
        raise CorruptCheckpointError(f"{path}: the tracker file is corrupted (expected an iteration number, found "
                                     f"{text[:40]!r})")
    return int(text)


def read_tracker_or_none(root: str) -> Optional[int]:
    try:
        return read_tracker(root)
    except CheckpointError:
        return None


def iteration_dirs(root: str) -> List[Tuple[str, int]]:
    """(directory, iteration) of every iter_XXXXXXX directory under `root`, newest first."""
    out = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        m = _ITER_DIR_RE.fullmatch(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((os.path.join(root, name), int(m.group(1))))
    return sorted(out, key=lambda x: -x[1])


def nothing_to_load(load: str) -> Optional[str]:
    """Why `load` holds no checkpoint to resume from (Megatron then starts from scratch with a warning), or None
    when there is one to load. A directory with iter_* checkpoints but no tracker is not "nothing": it is an error
    for resolve_checkpoint_dir to report, never silently restarted."""
    if re.search(r"iter_(\d+)/?$", load):
        return None  # an explicit iter_XXXXXXX directory: a missing one is a typo, reported by the loader
    if not os.path.exists(load):
        return "no such directory"
    if os.path.isfile(os.path.join(load, TRACKER)):
        return None
    if os.path.isdir(load) and not any(re.fullmatch(r"iter_\d+", d) for d in os.listdir(load)):
        return f"no {TRACKER} (no checkpoint saved there yet)"
    return None


def resolve_checkpoint_dir(load: str) -> Tuple[str, int]:
    """--load may name the root (tracker inside) or an iter_XXXXXXX directory."""
    if not os.path.exists(load):
        raise CheckpointError(f"--load {load}: no such directory")
    m = re.search(r"iter_(\d+)/?$", load)
    if m and os.path.isdir(load):
        return load, int(m.group(1))
    it = read_tracker(load)
    if it is None:
        raise CheckpointError(f"--load {load}: no {TRACKER} and not an iter_XXXXXXX directory")
    d = iter_dir(load, it)
    if not os.path.isdir(d):
        raise CorruptCheckpointError(f"--load {load}: {TRACKER} names iteration {it} but {d} is missing")
    return d, it


@functools.lru_cache(maxsize=None)
def _say_unverified(ckpt_dir: str) -> None:
    _log_rank0(f"checkpoint {ckpt_dir} has no {MANIFEST} (written before checksums existed): its files are loaded "
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


def load_checkpoint_file(ckpt_dir: str, path: str):
    """torch.load of one checkpoint file, after checking its size and xxh3-64 against the directory's checksums.json
    (one read: the verified bytes are what is unpickled). Missing, truncated or changed: CorruptCheckpointError."""
    import xxhash

    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"checkpoint file {path} is missing; the checkpoint is torn or corrupted")
    files = read_manifest(ckpt_dir)
    if files is None:
        source = path
    else:
        entry = files.get(os.path.relpath(path, ckpt_dir))
        if entry is None:
            raise CorruptCheckpointError(f"checkpoint file {path} is not listed in {os.path.join(ckpt_dir, MANIFEST)}"
                                         f"; the checkpoint is torn or corrupted")
        with open(path, "rb") as f:
            data = f.read(entry["bytes"] + 1)
        if len(data) != entry["bytes"]:
            raise CorruptCheckpointError(f"checkpoint file {path} has {'fewer' if len(data) < entry['bytes'] else 'more'}"
                                         f" bytes than recorded ({len(data) if len(data) < entry['bytes'] else 'more'}"
                                         f" vs {entry['bytes']}); the checkpoint is torn or corrupted")
        if xxhash.xxh3_64_hexdigest(data) != entry["xxh3_64"]:
            raise CorruptCheckpointError(f"checkpoint file {path} does not match its checksum in {MANIFEST}; the "
                                         f"checkpoint is torn or corrupted")
        source = io.BytesIO(data)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is an unreadable checkpoint
        raise CorruptCheckpointError(f"checkpoint file {path} is unreadable ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def num_tp_shards(ckpt_dir: str) -> int:
    """How many tensor-parallel ranks wrote `ckpt_dir` (its mp_rank_XX directories)."""
    return len([d for d in os.listdir(ckpt_dir) if re.fullmatch(r"mp_rank_\d\d", d)])


def load_dense(load: str, tp_rank: int = 0, tp_size: int = 1) -> Tuple[dict, str]:
    """This TP rank's dense file; a checkpoint saved with another --tensor-model-parallel-size is refused."""
    ckpt_dir, _ = resolve_checkpoint_dir(load)
    saved_tp = num_tp_shards(ckpt_dir)
    if saved_tp and saved_tp != tp_size:
        raise CheckpointError(f"--tensor-model-parallel-size mismatch: checkpoint {ckpt_dir} was saved with "
                              f"{saved_tp} tensor-parallel rank(s), the flags give {tp_size}; convert it with "
                              f"tools/checkpoint_tp.py --target-tp {tp_size}")
    return load_checkpoint_file(ckpt_dir, dense_path(ckpt_dir, tp_rank)), ckpt_dir


def read_expert_files(model, ckpt_dir: str, keep_optimizer: bool = True) -> Dict[Tuple[int, int], dict]:
    """This rank's expert files of `ckpt_dir` (verified), keyed by (MoE layer, global expert id); each read once.
    Without `keep_optimizer` each payload's Adam state is dropped as soon as its file is read (expert optimizer state
    offloaded to NVMe: it is re-read one file at a time into the store, never all in memory at once)."""
    out = {}
    for moe_idx, _, layer in _moe_layers(model):
        e = layer.num_local_experts
        for gid in range(layer.ep_rank * e, (layer.ep_rank + 1) * e):
            payload = load_checkpoint_file(ckpt_dir, expert_path(ckpt_dir, moe_idx, gid))
            if not keep_optimizer and isinstance(payload, dict):
                payload.pop("optimizer", None)
            out[(moe_idx, gid)] = payload
    return out


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


# Fields of ModelConfig/MoEConfig that must match between a checkpoint and the running flags.
_FLAG_OF_FIELD = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "ffn_hidden_size": "--ffn-hidden-size", "padded_vocab_size": "vocabulary size (--vocab-file/--tokenizer-model)",
    "max_position_embeddings": "--max-position-embeddings", "position_embedding_type": "--position-embedding-type",
    "num_experts": "--num-experts", "expert_interval": "--expert-interval", "mlp_type": "--mlp-type",
    # Megatron-LM core blocks and experts (issue 25)
    "normalization": "--normalization", "activation": "--swiglu (or the GELU flags)",
    "num_query_groups": "--num-query-groups", "kv_channels": "--kv-channels", "qk_layernorm": "--qk-layernorm",
    "rotary_percent": "--rotary-percent", "add_bias_linear": "--disable-bias-linear",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "multi_latent_attention": "--multi-latent-attention", "q_lora_rank": "--q-lora-rank",
    "kv_lora_rank": "--kv-lora-rank", "qk_head_dim": "--qk-head-dim", "qk_pos_emb_head_dim": "--qk-pos-emb-head-dim",
    "v_head_dim": "--v-head-dim", "layer_freq": "--moe-layer-freq", "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "shared_expert_ffn_hidden_size": "--moe-shared-expert-intermediate-size",
    "shared_expert_gate": "--moe-shared-expert-gate",
}


def check_config_match(saved: dict, running: dict, what: str, ckpt: str) -> None:
    for field, flag in _FLAG_OF_FIELD.items():
        if field in saved and field in running and _norm(saved[field]) != _norm(running[field]):
            raise CheckpointError(f"{flag} mismatch: checkpoint {ckpt} has {field}={_norm(saved[field])}, "
                                  f"the {what} flags give {_norm(running[field])}")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _renamed_legacy_keys(sd: dict) -> dict:
    """Checkpoints written before issue 14 name the Residual-MoE branch's linears fc1/fc2; the one MLP class
    (moe.experts.MLP) names them as the dense MLP does."""
    legacy = {".residual.mlp.fc1.": ".residual.mlp.dense_h_to_4h.", ".residual.mlp.fc2.": ".residual.mlp.dense_4h_to_h."}
    out = {}
    for k, v in sd.items():
        for old, new in legacy.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def load_model_state(model, payload: dict, ckpt_dir: str, strict: bool = True, load_experts: bool = True,
                     experts: Optional[dict] = None) -> None:
    """Loads dense weights, then (unless `load_experts` is False: experts offloaded to an expert store) each local
    expert's slice from its per-expert file (or from `experts`, read_expert_files' result, when given)."""
    is_expert = is_expert_param_name(model)
    own = model.state_dict()
    dense_sd = _renamed_legacy_keys(payload["model"])
    for k, v in dense_sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{ckpt_dir}: parameter {k} has shape {tuple(v.shape)} in the checkpoint but "
                                  f"{tuple(own[k].shape)} in the model built from the flags")
    missing = [k for k in own if k not in dense_sd and not is_expert.get(k, False)]
    unexpected = [k for k in dense_sd if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{ckpt_dir}: state does not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); check the architecture flags")
    model.load_state_dict(dense_sd, strict=False)
    if load_experts:
        _load_experts(model, ckpt_dir, load_weights=True, experts=experts)


def _load_experts(model, ckpt_dir: str, load_weights: bool, experts: Optional[dict] = None) -> Dict[str, dict]:
    """Reads this rank's expert files (unless given as `experts`); fills the local expert slices when `load_weights`.

    Without `load_weights`, returns the per-parameter Adam state stacked over the local experts (keyed by
    parameter name); with it, {} (the optimizer state is not needed then).
    """
    stacked_opt: Dict[str, dict] = {}
    params = dict(model.named_parameters())
    experts = read_expert_files(model, ckpt_dir) if experts is None else experts
    for moe_idx, prefix, layer in _moe_layers(model):
        e = layer.num_local_experts
        names = _expert_param_names(model, prefix)
        per_expert = [experts[(moe_idx, layer.ep_rank * e + i)] for i in range(e)]
        total = per_expert[0].get("num_experts")
        if total is not None and total != e * layer.ep_size:
            raise CheckpointError(f"--num-experts mismatch: checkpoint {ckpt_dir} MoE layer {moe_idx} has {total} "
                                  f"experts, the flags give {e * layer.ep_size}")
        with torch.no_grad():
            for n in names:
                short = n[len(prefix) + 1:]
                for i, ex in enumerate(per_expert if load_weights else ()):
                    if short not in ex["model"]:
                        raise CheckpointError(f"{ckpt_dir}: expert file for layer {moe_idx} lacks {short}")
                    src = ex["model"][short]
                    if tuple(src.shape) != tuple(params[n].shape[1:]):
                        raise CheckpointError(f"{ckpt_dir}: expert parameter {short} has shape {tuple(src.shape)}"
                                              f", the model expects {tuple(params[n].shape[1:])}")
                    params[n][i].copy_(src)
                if not load_weights and all(short in ex["optimizer"] for ex in per_expert):
                    keys = per_expert[0]["optimizer"][short].keys()
                    stacked_opt[n] = {k: (torch.stack([ex["optimizer"][short][k] for ex in per_expert])
                                          if torch.is_tensor(per_expert[0]["optimizer"][short][k])
                                          and per_expert[0]["optimizer"][short][k].dim() > 0
                                          else per_expert[0]["optimizer"][short][k]) for k in keys}
    return stacked_opt


def load_optimizer_state(model, optimizer, payload: dict, ckpt_dir: str, experts: Optional[dict] = None) -> None:
    state = dict(payload.get("optimizer", {}))
    if optimizer.offloads_expert_state:
        _fill_offloaded_expert_state(model, optimizer, ckpt_dir, experts)
    else:
        state.update(_load_experts(model, ckpt_dir, load_weights=False, experts=experts))
    optimizer.load_state_dict(state, ckpt_dir)  # ZeRO: each rank keeps the slice it owns, whatever wrote it


# ----------------------------------------------------------------------------------------------- --load-fallback
def load_candidates(load: str) -> Tuple[List[Tuple[str, int]], Optional[str]]:
    """What --load may load, newest first: the directory the tracker names (or --load itself when it is an
    iter_XXXXXXX directory), then every older iter_XXXXXXX directory; and why the tracker's choice cannot be loaded at
    all (a corrupted or missing tracker, or one naming a missing directory), else None."""
    if not os.path.exists(load):
        raise CheckpointError(f"--load {load}: no such directory")
    if re.search(r"iter_(\d+)/?$", load) and os.path.isdir(load):
        return [resolve_checkpoint_dir(load)], None
    dirs = iteration_dirs(load)
    try:
        it = read_tracker(load)
    except CorruptCheckpointError as e:
        return dirs, str(e)
    if it is None:
        if not dirs:
            raise CheckpointError(f"--load {load}: no {TRACKER} and not an iter_XXXXXXX directory")
        return dirs, f"--load {load}: {os.path.join(load, TRACKER)} is missing"
    older = [(d, i) for d, i in dirs if i < it]
    d = iter_dir(load, it)
    if not os.path.isdir(d):
        return older, f"{os.path.join(load, TRACKER)} names iteration {it} but {d} is missing; the checkpoint is torn"
    return [(d, it)] + older, None


def _first_error(err: Optional[str]) -> Optional[str]:
    """The lowest rank's error (None when no rank failed), on every rank: ranks read different expert files, so
    one may find a problem the others cannot see, and all must take the same decision."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return err
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, err)
    return next((e for e in out if e), None)


def _read_verified(ckpt_dir: str, model, groups, check=None, keep_optimizer: bool = True):
    """((dense payload, this rank's expert payloads), None), or (None, why) for a torn or corrupted checkpoint.
    `check(payload, ckpt_dir)` runs between the dense file and the expert files: a checkpoint of another architecture
    is reported as that (a CheckpointError naming the flag), not as the expert files it lacks. `keep_optimizer`: as
    read_expert_files."""
    try:
        payload, _ = load_dense(ckpt_dir, groups.tp_rank, groups.tp_size)
        if check is not None:
            check(payload, ckpt_dir)
        return (payload, read_expert_files(model, ckpt_dir, keep_optimizer)), None
    except CorruptCheckpointError as e:
        return None, str(e)


def read_training_checkpoint(ck, model, groups, check=None, keep_optimizer: bool = True) -> Tuple[str, dict, dict]:
    """(directory, dense payload, this rank's expert payloads) of what --load names, every file verified (without
    `keep_optimizer`, the expert payloads hold no Adam state: see read_expert_files).

    A torn or corrupted checkpoint (or tracker) is an error that names the file and the iteration --load-fallback
    would load; with --load-fallback (ck.load_fallback) the newest older iteration that verifies on every rank is
    loaded instead, said in one log line (see _after_fallback for what happens to the refused directories).
    Collective when distributed: every rank calls it."""
    candidates, problem = load_candidates(ck.load)
    refused: List[Tuple[Optional[str], str]] = [(None, problem)] if problem is not None else []
    tried = 0
    for d, it in candidates:
        if refused and not ck.load_fallback:
            break
        got, err = _read_verified(d, model, groups, check, keep_optimizer)
        err = _first_error(err)
        tried += 1
        if err is None:
            if refused:
                _after_fallback(ck, refused, d, it)
            return d, got[0], got[1]
        refused.append((d, err))
    if ck.load_fallback:
        raise CorruptCheckpointError(f"{refused[0][1]}; --load-fallback found no older checkpoint in {ck.load} that "
                                     f"verifies")
    nxt = next((it for d, it in candidates[tried:] if checkpoint_complete(d)), None)
    hint = (f"--load-fallback would load iteration {nxt}, the newest older complete checkpoint" if nxt is not None
            else f"no older complete checkpoint exists in {ck.load}")
    raise CorruptCheckpointError(f"{refused[0][1]}; {hint}")


def _after_fallback(ck, refused, ckpt_dir: str, iteration: int) -> None:
    """One log line; and, when --save is the --load directory (later saves will write there), rank 0 renames each
    refused iter_XXXXXXX to iter_XXXXXXX.corrupt (kept for inspection, never deleted; a later save of the same
    iteration can then neither replace nor be confused with it) and points the tracker at the loaded iteration."""
    note = ""
    if ck.save and os.path.abspath(ck.save) == os.path.abspath(ck.load) and not (
            dist.is_initialized() and dist.get_rank() != 0):
        moved = []
        try:
            for bad, _ in refused:
                if bad is not None and os.path.isdir(bad):
                    target = bad + ".corrupt"
                    n = 1
                    while os.path.exists(target):
                        target, n = f"{bad}.corrupt{n}", n + 1
                    os.replace(bad, target)
                    moved.append(os.path.basename(target))
            write_tracker(ck.load, iteration)
            note = (f"; kept the refused checkpoint as {', '.join(moved)} and " if moved else "; ") + \
                f"pointed {TRACKER} at iteration {iteration}"
        except OSError as e:
            note = f"; could not set the refused checkpoint aside ({e.strerror})"
    _log_rank0(f"--load-fallback: {refused[0][1]}; loaded iteration {iteration} ({ckpt_dir}) instead{note}")


def _fill_offloaded_expert_state(model, optimizer, ckpt_dir: str, experts: Optional[dict] = None) -> None:
    """Writes each local expert's Adam state from its checkpoint file (or its verified payload in `experts`, keyed by
    (MoE layer, global expert id), when that still holds its Adam state) into the offload store; the files read here
    are read (and verified) one at a time, so one expert's state is in memory at a time."""
    for moe_idx, prefix, layer in _moe_layers(model):
        e = layer.num_local_experts
        present = None
        for g in range(layer.ep_rank * e, (layer.ep_rank + 1) * e):
            path = expert_path(ckpt_dir, moe_idx, g)
            given = experts.get((moe_idx, g)) if experts is not None else None
            optim = (given if given is not None and "optimizer" in given
                     else load_checkpoint_file(ckpt_dir, path))["optimizer"]
            if present is not None and set(optim) != present:  # the in-memory load would stack unequal sets
                raise CheckpointError(f"{path}: holds Adam state for {sorted(optim)}, the other experts of MoE layer "
                                      f"{moe_idx} for {sorted(present)}; the checkpoint is inconsistent")
            present = set(optim)
            optimizer.load_expert_state(moe_idx, g, optim)


# ----------------------------------------------------------------------------------------------- training
def configs_for_checkpoint(cfg) -> dict:
    """What a checkpoint records of a TrainConfig: the architecture, tokenizer and batch settings."""
    return {"model": dataclasses.asdict(cfg.model),
            "moe": dataclasses.asdict(cfg.moe) if cfg.moe is not None else None,
            "tokenizer": {k: (os.path.abspath(v) if k in ("vocab_file", "merge_file", "tokenizer_model") and v
                              else v) for k, v in dataclasses.asdict(cfg.tokenizer).items()},
            "parallel": {"tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size},
            "data": {"seq_length": cfg.data.seq_length, "global_batch_size": cfg.data.global_batch_size,
                     "micro_batch_size": cfg.data.micro_batch_size, "seed": cfg.data.seed}}


def load_training_checkpoint(cfg, model, optimizer, scheduler, loss_scaler, groups) -> Optional[dict]:
    """Loads cfg.checkpoint.load (a TrainConfig's) into the model and, unless the flags say otherwise, the optimizer,
    LR scheduler, loss scaler and RNG streams; returns the restored counters {iteration, consumed_samples,
    consumed_tokens}, or None when they restart from zero (--finetune, --reset-iteration). The checkpoint's
    architecture must match the flags (CheckpointError naming the field)."""
    ck = cfg.checkpoint

    def check(payload: dict, ckpt_dir: str) -> None:  # the architecture, before any expert file is read
        saved = payload.get("configs", {})
        check_config_match(saved.get("model", {}), dataclasses.asdict(cfg.model), "training", ckpt_dir)
        if saved.get("moe") or cfg.moe:
            check_config_match(saved.get("moe") or {"num_experts": [1]},
                               dataclasses.asdict(cfg.moe) if cfg.moe else {"num_experts": [1]}, "training", ckpt_dir)

    # offloaded expert Adam state is not held for all experts at once: read_training_checkpoint verifies every file
    # and keeps the expert weights; _fill_offloaded_expert_state re-reads the state one file at a time
    offloaded = optimizer.offloads_expert_state
    ckpt_dir, payload, experts = read_training_checkpoint(ck, model, groups, check, keep_optimizer=not offloaded)
    saved = payload.get("configs", {})
    if saved.get("moe") and cfg.moe and "drop_policy" not in saved["moe"]:
        log.warning("%s was trained before the routing choices were recorded (exact-GELU experts, probability "
                       "drop priority, gates renormalised before dropping, RTS in training only: "
                       "moe.config.LEGACY_ROUTING); training resumes with the flags' routing (DeepSpeed's) and "
                       "activation", ckpt_dir)
    load_model_state(model, payload, ckpt_dir, experts=experts)
    if ck.finetune:
        return None
    if ck.reset_iteration:  # a student starting a fresh schedule from these weights (and optimizer)
        if not ck.no_load_optim:
            load_optimizer_state(model, optimizer, payload, ckpt_dir, experts)
        if not ck.no_load_rng and payload.get("rng"):
            set_rng_state(payload["rng"])
        return None
    if not ck.no_load_optim:
        load_optimizer_state(model, optimizer, payload, ckpt_dir, experts)
        if payload.get("scheduler"):
            scheduler.load_state_dict(payload["scheduler"])
        if loss_scaler is not None and payload.get("loss_scaler"):
            loss_scaler.load_state_dict(payload["loss_scaler"])
    if not ck.no_load_rng and payload.get("rng"):
        set_rng_state(payload["rng"])
        tracker = getattr(model, "rng_tracker", None)
        if tracker is not None and payload["rng"].get("tensor_parallel"):
            tracker.load_state_dict(payload["rng"]["tensor_parallel"])
    return {"iteration": int(payload["iteration"]),
            "consumed_samples": int(payload["counters"]["consumed_samples"]),
            "consumed_tokens": int(payload["counters"]["consumed_tokens"])}
