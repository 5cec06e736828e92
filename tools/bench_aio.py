"""Benchmark of the aio op against dd O_DIRECT, torch.save+fsync and cold torch.load on one disk.

Every repetition runs every measurement once (interleaved, so drifting load on a shared machine hits
all of them alike); the table shows medians and checks the targets of the aio issue:
locked write >= 2.4x dd O_DIRECT write, locked read >= 1.0x dd O_DIRECT read, plain tensors >= 90%
of locked, aio write >= 3x torch.save+fsync, aio read >= 2.5x cold torch.load.

    python tools/bench_aio.py [--dir /tmp] [--size_mib 1024] [--reps 5] [--config '{"block_size": ...}']
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe.ops.op_builder import AsyncIOBuilder  # noqa: E402

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


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_dd(args):
    subprocess.run(["dd", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_repetition(handle, locked, plain, work_dir, times):
    nbytes = locked.numel()
    aio_path = os.path.join(work_dir, "aio.bin")
    for kind, tensor in (("locked", locked), ("plain", plain)):
        for mode in ("sync", "async"):
            if os.path.exists(aio_path):
                os.unlink(aio_path)  # a fresh file each time, as torch.save and dd get
            if mode == "sync":
                times[f"aio write {kind} {mode}"].append(timed(lambda: handle.sync_pwrite(tensor, aio_path)))
            else:
                times[f"aio write {kind} {mode}"].append(
                    timed(lambda: (handle.async_pwrite(tensor, aio_path), handle.wait())))
    for kind, tensor in (("locked", locked), ("plain", plain)):
        for mode in ("sync", "async"):
            drop_cache(aio_path)  # O_DIRECT bypasses the cache anyway; this keeps the runs alike
            if mode == "sync":
                times[f"aio read {kind} {mode}"].append(timed(lambda: handle.sync_pread(tensor, aio_path)))
            else:
                times[f"aio read {kind} {mode}"].append(
                    timed(lambda: (handle.async_pread(tensor, aio_path), handle.wait())))
    os.unlink(aio_path)

    save_path = os.path.join(work_dir, "save.pt")

    def save():
        with open(save_path, "wb") as f:
            torch.save(plain, f)
            f.flush()
            os.fsync(f.fileno())

    times["torch.save+fsync"].append(timed(save))
    drop_cache(save_path)
    times["torch.load (cold)"].append(timed(lambda: torch.load(save_path, weights_only=True)))
    os.unlink(save_path)

    dd_path = os.path.join(work_dir, "dd.bin")
    count = str(nbytes // (1 << 20))
    times["dd write O_DIRECT"].append(timed(lambda: run_dd(
        ["if=/dev/zero", f"of={dd_path}", "bs=1M", f"count={count}", "oflag=direct"])))
    drop_cache(dd_path)
    times["dd read O_DIRECT"].append(timed(lambda: run_dd(
        [f"if={dd_path}", "of=/dev/null", "bs=1M", f"count={count}", "iflag=direct"])))
    os.unlink(dd_path)


def report(times, nbytes, reps, config, work_dir):
    gbps = {name: nbytes / statistics.median(ts) / 1e9 for name, ts in times.items()}
    print(f"\naio benchmark: {nbytes / 2**30:.2f} GiB tensor, {reps} interleaved repetitions (medians), "
          f"dir {work_dir}\nhandle config: {json.dumps(config)}\n")
    print(f"{'measurement':28s} {'GB/s':>7s} {'min':>7s} {'max':>7s}")
    for name, ts in times.items():
        print(f"{name:28s} {gbps[name]:7.2f} {nbytes / max(ts) / 1e9:7.2f} {nbytes / min(ts) / 1e9:7.2f}")

    best_write = max(gbps["aio write locked sync"], gbps["aio write locked async"])
    best_read = max(gbps["aio read locked sync"], gbps["aio read locked async"])
    plain_write = max(gbps["aio write plain sync"], gbps["aio write plain async"])
    plain_read = max(gbps["aio read plain sync"], gbps["aio read plain async"])
    targets = [
        ("locked write / dd O_DIRECT write", best_write / gbps["dd write O_DIRECT"], 2.4),
        ("locked read / dd O_DIRECT read", best_read / gbps["dd read O_DIRECT"], 1.0),
        ("plain write / locked write", plain_write / best_write, 0.9),
        ("plain read / locked read", plain_read / best_read, 0.9),
        ("locked write / torch.save+fsync", best_write / gbps["torch.save+fsync"], 3.0),
        ("locked read / cold torch.load", best_read / gbps["torch.load (cold)"], 2.5),
    ]
    print(f"\n{'target':36s} {'ratio':>7s} {'needed':>7s}  result")
    misses = 0
    for name, ratio, needed in targets:
        ok = ratio >= needed
        misses += not ok
        print(f"{name:36s} {ratio:7.2f} {needed:7.2f}  {'PASS' if ok else 'MISS'}")
    return misses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp", help="where temporary files go (same disk as the data)")
    parser.add_argument("--size_mib", type=int, default=1024, help="tensor size in MiB")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5 for the targets)")
    parser.add_argument("--config", default=None, help="handle config JSON (e.g. nvme_tune.py's output)")
    args = parser.parse_args(argv)

    config = dict(DEFAULT_CONFIG, **(json.loads(args.config) if args.config else {}))
    handle = AsyncIOBuilder().load().aio_handle(**config)
    nbytes = args.size_mib << 20
    locked = handle.new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))
    locked.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    plain = locked.clone()  # torch's allocator: 64-byte aligned, not page-locked
    work_dir = tempfile.mkdtemp(prefix="bench_aio_", dir=args.dir)
    times = defaultdict(list)
    try:
        one_repetition(handle, locked, plain, work_dir, defaultdict(list))  # warm-up, not counted
        for rep in range(args.reps):
            one_repetition(handle, locked, plain, work_dir, times)
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    misses = report(times, nbytes, args.reps, config, work_dir)
    return 0 if misses == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
