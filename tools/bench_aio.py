"""Benchmark of the aio op against dd O_DIRECT, torch.save+fsync and cold torch.load on one disk.

Every repetition runs every measurement once (interleaved, so drifting load on a shared machine hits
all of them alike); the table shows medians and checks the targets of the aio issue:
locked write >= 2.4x dd O_DIRECT write, locked read >= 1.0x dd O_DIRECT read, plain tensors >= 90%
of locked, aio write >= 3x torch.save+fsync, aio read >= 2.5x cold torch.load.

When DeepSpeed is importable (`pip install deepspeed==0.19.8` into the venv; its aio op JIT-builds on
first use, ~3 min), DeepSpeed's own aio_handle runs the same transfers with the same config in the same
repetitions, and the targets are also checked for it: the reference the issue's ratios came from,
measured on this disk today. `--no_deepspeed` leaves it out.

    python tools/bench_aio.py [--dir /tmp] [--size_mib 1024] [--reps 5] [--config '{"block_size": ...}']
        [--no_deepspeed]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch

from moe.ops.op_builder import AsyncIOBuilder

DEFAULT_CONFIG = {"block_size": 1048576, "queue_depth": 128, "single_submit": False,
                  "overlap_events": False, "intra_op_parallelism": 1}


def drop_cache(path):
    """Evicts `path` from the page cache: drop_caches when root, else fadvise(DONTNEED) (clean pages)."""
    os.sync()
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fresh(path):
    """Removes `path` and syncs, so that no write is timed while an earlier file's freeing (journal
    commit, discards on a `discard` mount) is still in flight; every write measurement starts so."""
    if os.path.exists(path):
        os.unlink(path)
    os.sync()


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_dd(args):
    subprocess.run(["dd", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def deepspeed_handle(config):
    """DeepSpeed's aio_handle with `config`, or (None, why) when DeepSpeed or its aio op is unavailable."""
    try:
        import ctypes
        import logging
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        # DeepSpeed 0.19.8 JIT-builds async_io without -laio on CPU-only torch (the .so then fails
        # with "undefined symbol: io_submit"); loading libaio globally first resolves it.
        ctypes.CDLL("libaio.so.1", mode=ctypes.RTLD_GLOBAL)
        import deepspeed
        from deepspeed.ops.op_builder.async_io import AsyncIOBuilder as DSAsyncIOBuilder
        module = DSAsyncIOBuilder().load(verbose=False)
        handle = module.aio_handle(config["block_size"], config["queue_depth"], config["single_submit"],
                                   config["overlap_events"], config["intra_op_parallelism"])
        return handle, f"deepspeed {deepspeed.__version__}"
    except Exception as exc:  # not installed, no compiler, no libaio: the bench runs without it
        return None, f"deepspeed aio unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"


def aio_transfers(prefix, handle, locked, plain, work_dir, times):
    """Writes then reads `locked` and `plain` with `handle`, sync and async; times under `prefix ...`."""
    aio_path = os.path.join(work_dir, f"{prefix}.bin")
    for kind, tensor in (("locked", locked), ("plain", plain)):
        for mode in ("sync", "async"):
            fresh(aio_path)  # a fresh file each time, as torch.save and dd get
            if mode == "sync":
                times[f"{prefix} write {kind} {mode}"].append(timed(lambda: handle.sync_pwrite(tensor, aio_path)))
            else:
                times[f"{prefix} write {kind} {mode}"].append(
                    timed(lambda: (handle.async_pwrite(tensor, aio_path), handle.wait())))
    for kind, tensor in (("locked", locked), ("plain", plain)):
        for mode in ("sync", "async"):
            drop_cache(aio_path)  # O_DIRECT bypasses the cache anyway; this keeps the runs alike
            if mode == "sync":
                times[f"{prefix} read {kind} {mode}"].append(timed(lambda: handle.sync_pread(tensor, aio_path)))
            else:
                times[f"{prefix} read {kind} {mode}"].append(
                    timed(lambda: (handle.async_pread(tensor, aio_path), handle.wait())))
    os.unlink(aio_path)


def one_repetition(handles, plain, work_dir, times):
    """handles: [(prefix, handle, its locked tensor)]; then torch.save/load and dd, all on one disk."""
    nbytes = plain.numel()
    for prefix, handle, locked in handles:
        aio_transfers(prefix, handle, locked, plain, work_dir, times)

    save_path = os.path.join(work_dir, "save.pt")

    def save():
        with open(save_path, "wb") as f:
            torch.save(plain, f)
            f.flush()
            os.fsync(f.fileno())

    fresh(save_path)
    times["torch.save+fsync"].append(timed(save))
    drop_cache(save_path)
    times["torch.load (cold)"].append(timed(lambda: torch.load(save_path, weights_only=True)))
    os.unlink(save_path)

    dd_path = os.path.join(work_dir, "dd.bin")
    count = str(nbytes // (1 << 20))
    fresh(dd_path)
    times["dd write O_DIRECT"].append(timed(lambda: run_dd(
        ["if=/dev/zero", f"of={dd_path}", "bs=1M", f"count={count}", "oflag=direct"])))
    drop_cache(dd_path)
    times["dd read O_DIRECT"].append(timed(lambda: run_dd(
        [f"if={dd_path}", "of=/dev/null", "bs=1M", f"count={count}", "iflag=direct"])))
    os.unlink(dd_path)


def check_targets(gbps, prefix):
    """Prints the issue's six ratios for the handle timed under `prefix`; returns how many miss."""
    best_write = max(gbps[f"{prefix} write locked sync"], gbps[f"{prefix} write locked async"])
    best_read = max(gbps[f"{prefix} read locked sync"], gbps[f"{prefix} read locked async"])
    plain_write = max(gbps[f"{prefix} write plain sync"], gbps[f"{prefix} write plain async"])
    plain_read = max(gbps[f"{prefix} read plain sync"], gbps[f"{prefix} read plain async"])
    targets = [
        ("locked write / dd O_DIRECT write", best_write / gbps["dd write O_DIRECT"], 2.4),
        ("locked read / dd O_DIRECT read", best_read / gbps["dd read O_DIRECT"], 1.0),
        ("plain write / locked write", plain_write / best_write, 0.9),
        ("plain read / locked read", plain_read / best_read, 0.9),
        ("locked write / torch.save+fsync", best_write / gbps["torch.save+fsync"], 3.0),
        ("locked read / cold torch.load", best_read / gbps["torch.load (cold)"], 2.5),
    ]
    print(f"\n{'target (' + prefix + ')':36s} {'ratio':>7s} {'needed':>7s}  result")
    misses = 0
    for name, ratio, needed in targets:
        ok = ratio >= needed
        misses += not ok
        print(f"{name:36s} {ratio:7.2f} {needed:7.2f}  {'PASS' if ok else 'MISS'}")
    return misses


def report(times, nbytes, reps, config, work_dir, prefixes):
    gbps = {name: nbytes / statistics.median(ts) / 1e9 for name, ts in times.items()}
    print(f"\naio benchmark: {nbytes / 2**30:.2f} GiB tensor, {reps} interleaved repetitions (medians), "
          f"dir {work_dir}\nhandle config: {json.dumps(config)}\n")
    print(f"{'measurement':34s} {'GB/s':>7s} {'min':>7s} {'max':>7s}")
    for name, ts in times.items():
        print(f"{name:34s} {gbps[name]:7.2f} {nbytes / max(ts) / 1e9:7.2f} {nbytes / min(ts) / 1e9:7.2f}")
    misses = check_targets(gbps, "aio")
    for prefix in prefixes:
        if prefix == "aio":
            continue
        check_targets(gbps, prefix)  # the reference's ratios: informative, not this project's result
        print(f"\n{'aio / ' + prefix + ' (same run)':36s} {'write':>7s} {'read':>7s}")
        for kind in ("locked", "plain"):
            for mode in ("sync", "async"):
                w = gbps[f"aio write {kind} {mode}"] / gbps[f"{prefix} write {kind} {mode}"]
                r = gbps[f"aio read {kind} {mode}"] / gbps[f"{prefix} read {kind} {mode}"]
                print(f"{kind + ' ' + mode:36s} {w:7.2f} {r:7.2f}")
    return misses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp", help="where temporary files go (same disk as the data)")
    parser.add_argument("--size_mib", type=int, default=1024, help="tensor size in MiB")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5 for the targets)")
    parser.add_argument("--config", default=None, help="handle config JSON (e.g. nvme_tune.py's output)")
    parser.add_argument("--no_deepspeed", action="store_true",
                        help="do not time DeepSpeed's aio_handle even when it is importable")
    args = parser.parse_args(argv)

    config = dict(DEFAULT_CONFIG, **(json.loads(args.config) if args.config else {}))
    handle = AsyncIOBuilder().load().aio_handle(**config)
    nbytes = args.size_mib << 20
    locked = handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
    locked.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    plain = locked.clone()  # torch's allocator: 64-byte aligned, not page-locked
    handles = [("aio", handle, locked)]
    if not args.no_deepspeed:
        ds, why = deepspeed_handle(config)
        print(why, file=sys.stderr)
        if ds is not None:
            ds_locked = ds.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
            ds_locked.copy_(locked)
            handles.append(("deepspeed", ds, ds_locked))
    work_dir = tempfile.mkdtemp(prefix="bench_aio_", dir=args.dir)
    times = defaultdict(list)
    try:
        one_repetition(handles, plain, work_dir, defaultdict(list))  # warm-up, not counted
        for rep in range(args.reps):
            one_repetition(handles, plain, work_dir, times)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    misses = report(times, nbytes, args.reps, config, work_dir, [p for p, _, _ in handles])
    return 0 if misses == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
