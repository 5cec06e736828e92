#!/usr/bin/env python
"""Write the NVMe expert store of a MoE checkpoint: tools/offload_experts.py --load CKPT --out DIR.

One 4 KiB-aligned record per (MoE layer, global expert) in DIR/experts.bin and a manifest (shapes, dtypes, offsets,
a checksum per record) in DIR/manifest.json; then `tools/eval_zeroshot.py` / `tools/generate.py --moe-offload nvme
--moe-expert-store DIR` read the experts from it. Exit 2 with one line on a bad checkpoint, a non-empty or
unwritable directory, or a full disk (nothing partial is left).
"""
import argparse
import logging
import sys


from megatron.offload import USER_ERRORS, write_expert_store


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (latest_checkpointed_iteration.txt) or iter dir")
    p.add_argument("--out", required=True, help="new or empty directory for the store (on the NVMe disk)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        store = write_expert_store(args.load, args.out)
    except USER_ERRORS as e:  # a bug is not one of these: it keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(store.records)} expert records, {store.total_bytes() / 1e6:.1f} MB, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
