#!/usr/bin/env python
"""Write the NVMe expert store of a MoE model:

    tools/offload_experts.py --load CKPT --out DIR        # from a checkpoint's expert files
    tools/offload_experts.py --hf-dir HF_DIR --out DIR    # straight from a Hugging Face directory's safetensors

One 4 KiB-aligned record per (MoE layer, global expert) in DIR/experts.bin and a manifest (shapes, dtypes, offsets,
a checksum per record) in DIR/manifest.json; then `tools/eval_zeroshot.py` / `tools/generate.py --moe-offload nvme
--moe-expert-store DIR` read the experts from it. Records keep the weights' dtype (bf16 stays bf16). --hf-dir reads
the safetensors one tensor at a time without building the model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3:
megatron/hf's name mapping); a checkpoint imported from that directory (tools/convert_hf.py import) runs with the
store. Exit 2 with one line on a bad checkpoint or directory, an unsupported architecture or dtype, a non-empty or
unwritable output directory, or a full disk (nothing partial is left).
"""
import argparse
import logging
import sys


from megatron.offload import USER_ERRORS, write_expert_store, write_hf_expert_store


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="checkpoint root (latest_checkpointed_iteration.txt) or iter dir")
    src.add_argument("--hf-dir", help="a Hugging Face MoE directory (config.json + safetensors shards)")
    p.add_argument("--out", required=True, help="new or empty directory for the store (on the NVMe disk)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.hf_dir is not None:
            store = write_hf_expert_store(args.hf_dir, args.out)
        else:
            store = write_expert_store(args.load, args.out)
    except USER_ERRORS as e:  # a bug is not one of these: it keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(store.records)} expert records, {store.total_bytes() / 1e6:.1f} MB, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
