"""Sweeps aio_handle settings on one directory and prints the fastest read/write config (like ds_nvme_tune).

    python tools/nvme_tune.py --nvme_dir /mnt/nvme [--io_size 268435456] [--loops 3]
        [--sweep_config '{"block_size": [262144, 1048576], "queue_depth": [32, 128]}'] [--no_read] [--no_write]

Each config moves --io_size bytes from/to a page-locked tensor --loops times; its speed is the median.
The printed JSON is the `aio` section of a DeepSpeed-style config (and the kwargs of aio_handle).
"""
import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from megatron.errors import ConfigError
from moe.ops.op_builder import AsyncIOBuilder

DEFAULT_SWEEP = {
    "block_size": [262144, 1048576, 4194304],
    "queue_depth": [8, 32, 128],
    "intra_op_parallelism": [1, 2, 4],
    "single_submit": [False, True],
    "overlap_events": [False, True],
}


def parse_sweep(text):
    """--sweep_config: a JSON object (or a path to one) mapping setting name -> list of values."""
    if text is None:
        return dict(DEFAULT_SWEEP)
    try:
        raw = json.load(open(text)) if os.path.isfile(text) else json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--sweep_config: not a JSON object or a file holding one ({e})") from None
    unknown = sorted(set(raw) - set(DEFAULT_SWEEP))
    if unknown:
        raise ConfigError(f"--sweep_config: unknown setting(s) {unknown}; known: {sorted(DEFAULT_SWEEP)}")
    sweep = dict(DEFAULT_SWEEP)
    sweep.update({k: v if isinstance(v, list) else [v] for k, v in raw.items()})
    return sweep


def configs(sweep):
    names = list(sweep)
    for values in itertools.product(*(sweep[n] for n in names)):
        yield dict(zip(names, values))


def measure(aio, config, tensor, path, read, loops):
    """Median GB/s of `loops` sync transfers of `tensor` with one handle built from `config`."""
    handle = aio.aio_handle(**config)
    seconds = []
    for _ in range(loops):
        if not read and os.path.exists(path):
            os.unlink(path)
        start = time.perf_counter()
        (handle.sync_pread if read else handle.sync_pwrite)(tensor, path)
        seconds.append(time.perf_counter() - start)
    return tensor.numel() * tensor.element_size() / statistics.median(seconds) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvme_dir", required=True, help="directory on the disk to tune (temp files go here)")
    parser.add_argument("--io_size", type=int, default=256 << 20, help="bytes per transfer (default 256 MiB)")
    parser.add_argument("--loops", type=int, default=3, help="transfers per config (median is kept)")
    parser.add_argument("--sweep_config", default=None, help="JSON (or JSON file) of setting -> values to sweep")
    parser.add_argument("--no_read", action="store_true", help="skip the read sweep")
    parser.add_argument("--no_write", action="store_true", help="skip the write sweep")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.nvme_dir):
        parser.error(f"--nvme_dir {args.nvme_dir!r} is not a directory")
    if args.no_read and args.no_write:
        parser.error("--no_read and --no_write leave nothing to measure")
    try:
        sweep = parse_sweep(args.sweep_config)
    except ConfigError as e:
        parser.error(str(e))

    aio = AsyncIOBuilder().load()
    setup = aio.aio_handle()
    tensor = setup.new_cpu_locked_tensor(args.io_size, torch.empty(0, dtype=torch.uint8))
    tensor.copy_(torch.randint(0, 256, (args.io_size,), dtype=torch.uint8))
    work_dir = tempfile.mkdtemp(prefix="nvme_tune_", dir=args.nvme_dir)
    path = os.path.join(work_dir, "tune.bin")
    results = {"read": [], "write": []}
    try:
        if not args.no_read:
            setup.sync_pwrite(tensor, path)
        all_configs = list(configs(sweep))
        for i, config in enumerate(all_configs):
            line = []
            for op in ("write", "read"):
                if getattr(args, f"no_{op}"):
                    continue
                gbps = measure(aio, config, tensor, path, op == "read", args.loops)
                results[op].append((gbps, config))
                line.append(f"{op} {gbps:6.2f} GB/s")
            print(f"[{i + 1}/{len(all_configs)}] {json.dumps(config)}: {', '.join(line)}", flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    best = {op: max(r, key=lambda x: x[0]) for op, r in results.items() if r}
    print("\nBest performance (GB/sec): " + ", ".join(f"{op} = {best[op][0]:.2f}" for op in ("read", "write")
                                                     if op in best))
    for op in ("read", "write"):
        if op in best:
            print(f"best {op} config: {json.dumps(best[op][1])}")
    if len(best) == 2:
        # One config for both directions: the best harmonic mean of read and write speed.
        write_by_key = {json.dumps(c, sort_keys=True): g for g, c in results["write"]}

        def harmonic(read_result):
            read_gbps, config = read_result
            return 2 / (1 / read_gbps + 1 / write_by_key[json.dumps(config, sort_keys=True)])

        chosen = max(results["read"], key=harmonic)[1]
    else:
        chosen = next(iter(best.values()))[1]
    print(json.dumps({"aio": chosen}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
