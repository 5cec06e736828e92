"""One config's training step on this machine's device (CUDA when present): tokens/s, TFLOP/s, MFU, peak memory and
host syncs per step, the figures examples_moe/gpu_check.sh prints.

    python tools/bench_gpu_step.py --config moe-h512 --bf16          # 8 layers, h512, 8 experts every 2nd layer
    python tools/bench_gpu_step.py --config dense350m-moe16 --bf16   # 24 layers, h1024, s2048, 16 experts
    python tools/bench_gpu_step.py --config tiny --steps 2           # a seconds-long CPU smoke run

Training steps are megatron.training.train_step on synthetic tokens (no dataset), after --warmup steps. MFU is taken
against --peak-flops (default: the device's data-sheet peak for the compute dtype, megatron/flops.py). Host syncs:
on CUDA one more step under torch.cuda.set_sync_debug_mode("warn"), counting its warnings; on the CPU the same step
under megatron.audit.DispatchAudit (ops that would sync on CUDA); then the step's aten op count. Prints one JSON line
per config.
"""
import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron import device_settings, parallel_state  # noqa: E402
from megatron.arguments import parse_args, train_config_from_args  # noqa: E402
from megatron.audit import DispatchAudit  # noqa: E402
from megatron.flops import flops_per_token, peak_flops  # noqa: E402
from megatron.training import compute_dtype, setup_train_state, train_step  # noqa: E402

CONFIGS = {
    "moe-h512": ["--num-layers", "8", "--hidden-size", "512", "--num-attention-heads", "8", "--seq-length", "512",
                 "--micro-batch-size", "8", "--num-experts", "8", "--expert-interval", "2", "--topk", "2"],
    "dense350m-moe16": ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16",
                        "--seq-length", "2048", "--micro-batch-size", "4", "--num-experts", "16",
                        "--expert-interval", "2", "--topk", "1"],
    "tiny": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
             "--micro-batch-size", "2", "--num-experts", "4", "--expert-interval", "2", "--topk", "2"],
}
COMMON = ["--train-iters", "1000", "--lr", "1e-4", "--hidden-dropout", "0", "--attention-dropout", "0"]


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="moe-h512")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--peak-flops", type=float, default=None, help="MFU denominator (default: the device's peak)")
    p.add_argument("--dry-run", action="store_true", help="print the training flags and exit")
    args, extra = p.parse_known_args()  # anything else is a pretrain_gpt.py flag (--bf16, --disable-moe-...)
    return args, extra


def _batches(b: int, s: int, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    while True:
        yield {"text": torch.randint(0, vocab, (b, s + 1), generator=g).pin_memory() if device.type == "cuda"
               else torch.randint(0, vocab, (b, s + 1), generator=g)}


def _syncs_in_one_step(st, it) -> dict:
    if st.device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(st, it)
                torch.cuda.synchronize()  # explicit: not counted
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        return {"host_syncs_per_step": len(found), "sync_kinds": sorted(set(found))[:5]}
    with DispatchAudit() as audit:
        train_step(st, it)
    return {"host_syncs_per_step": len(audit.syncs), "sync_kinds": sorted(audit.sync_sites())[:5]}


def main() -> int:
    args, extra = parse()
    argv = CONFIGS[args.config] + COMMON + extra
    if args.dry_run:
        print(" ".join(["tools/bench_gpu_step.py", "--config", args.config] + extra), "->", " ".join(argv))
        return 0
    cfg = train_config_from_args(parse_args(argv), args.vocab_size)
    device_settings.set_cublas_workspace(cfg.deterministic)
    _, _, device = parallel_state.init_distributed(cfg.parallel.distributed_backend)
    groups = parallel_state.initialize(1, cfg.moe.ep_size if cfg.moe else (1,))
    st = setup_train_state(cfg, groups, device)
    it = _batches(cfg.data.micro_batch_size, cfg.data.seq_length, args.vocab_size, device)
    for _ in range(args.warmup):
        train_step(st, it)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        m = train_step(st, it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    tokens = args.steps * cfg.data.global_batch_size * cfg.data.seq_length
    flops = flops_per_token(cfg.model, cfg.moe) * tokens / elapsed
    peak, source = peak_flops(device, compute_dtype(cfg), cfg.tf32, args.peak_flops)
    out = {"config": args.config, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": str(compute_dtype(cfg)).replace("torch.", ""),
           "params_M": round(sum(p.numel() for p in st.model.parameters()) / 1e6, 1),
           "ms_per_step": round(1000 * elapsed / args.steps, 2), "tokens_per_s": round(tokens / elapsed),
           "tflops_per_s": round(flops / 1e12, 2), "mfu_percent": round(100 * flops / peak, 1),
           "peak_tflops": round(peak / 1e12, 3), "peak_source": source, "lm_loss": round(m["lm_loss"], 4),
           "peak_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
           if device.type == "cuda" else None}
    out.update(_syncs_in_one_step(st, it))
    with DispatchAudit(record_sites=False) as audit:  # the step's aten op count (kernel launches, up to fusion)
        train_step(st, it)
    out["aten_ops_per_step"] = audit.total_ops
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
