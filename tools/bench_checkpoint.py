#!/usr/bin/env python
"""Checkpoint save/restore wall time (and GB/s) of this project's checkpointing against a plain torch.save /
torch.load of the same state (model + Adam) on the same disk, measured side by side, medians of --repeats.

    python tools/bench_checkpoint.py [--work-dir outputs/bench_checkpoint] [--repeats 3]
    python tools/bench_checkpoint.py --async [--repeats 3]      # training stall per save, sync vs --async-save

Models: the demo's (4 layers, hidden 128, 8 experts top-1 every other layer, GPT-2 vocabulary) and a wide-expert one
(4 layers, hidden 256, 64 experts of ffn 1024 per MoE layer). Both sides fsync what they write; the page cache is
dropped (as root) before every timed load, so loads read from the disk. Our save includes hashing every file and
writing checksums.json; our load verifies every file against it before unpickling.

--async (64-expert model): the training thread's stall per save through CheckpointManager.maybe_save, synchronous
against --async-save. The asynchronous stall is every moment the training thread spends inside maybe_save for that
save: the CPU snapshot of buffers, RNG and counters when it starts (parameters and Adam state are copied on the
writing thread behind the next step's gradient computation), the time the next optimizer step is held until those
copies are done, and the commit (checksums.json, rename, tracker) at the first step after the background write
finished; between them the loop runs optimizer steps (every weight and Adam tensor changes in
place), as training would. Also printed: the background write's wall time and the steps it overlapped.
"""
import argparse
import os
import shutil
import statistics
import sys
import time


import torch

from megatron import checkpointing
from megatron.config import ModelConfig, OptimizerConfig
from megatron.model import GPTModel
from megatron.optimizer import build_optimizer
from moe.config import MoEConfig

MODELS = {
    "demo (4x128, 8 experts)": dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                                   num_experts=8, vocab=50304),
    "64 experts (4x256, ffn 1024)": dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                                         num_experts=64, vocab=8192),
}


def drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def build(spec):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=spec["num_layers"], hidden_size=spec["hidden_size"],
                      num_attention_heads=spec["num_attention_heads"], ffn_hidden_size=spec["ffn_hidden_size"],
                      seq_length=256, max_position_embeddings=256, padded_vocab_size=spec["vocab"])
    model = GPTModel(cfg, MoEConfig(num_experts=spec["num_experts"], expert_interval=2, topk=1))
    opt = build_optimizer(model, OptimizerConfig(lr=1e-4))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # Adam state exists
    return model, opt


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def torch_save_fsync(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def train_step(model, opt) -> None:
    """What the benchmark's loop runs between saves: every weight and every Adam tensor changes in place."""
    for q in model.parameters():
        q.grad = torch.randn_like(q)
    opt.step()


def bench_async(args) -> None:
    spec = MODELS["64 experts (4x256, ffn 1024)"]
    model, opt = build(spec)
    roots = {mode: os.path.join(args.work_dir, mode) for mode in ("sync", "async")}
    managers = {mode: checkpointing.CheckpointManager(roots[mode], None, model, opt, None, {}, async_save=mode == "async")
                for mode in roots}
    rows = {k: [] for k in ("sync", "async", "snap", "held", "write", "steps", "step", "step_alone")}
    it = 0
    for _ in range(args.repeats):
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        train_step(model, opt)
        rows["step_alone"].append(time.perf_counter() - t)
        it += 1
        t = time.perf_counter()
        managers["sync"].maybe_save(it, force=True)
        rows["sync"].append(time.perf_counter() - t)
        m = managers["async"]
        waited0 = m.waited_seconds
        t = time.perf_counter()
        m.maybe_save(it, force=True)
        stall, steps, step_time, t_write = time.perf_counter() - t, 0, 0.0, time.perf_counter()
        rows["snap"].append(stall)
        while m._inflight is not None:  # training goes on; each step polls (and, once written, commits)
            t = time.perf_counter()
            train_step(model, opt)
            step_time += time.perf_counter() - t
            steps += 1
            it += 1
            t = time.perf_counter()
            m.maybe_save(it)
            stall += time.perf_counter() - t
        rows["write"].append(time.perf_counter() - t_write)
        rows["held"].append(m.waited_seconds - waited0)
        rows["async"].append(stall + rows["held"][-1])
        rows["steps"].append(steps)
        rows["step"].append(step_time / max(steps, 1))
    first = {k: v[0] for k, v in rows.items()}  # the first async save also faults its staging buffers in
    med = {k: statistics.median(v[1:] or v) for k, v in rows.items()}
    nbytes = dir_bytes(checkpointing.iter_dir(roots["sync"], checkpointing.read_tracker(roots["sync"])))
    print("| model | save | bytes | sync save stall s | async stall s (snapshot + step held + commit) | async / sync | "
          "background write s | steps during write | step s during write | step s alone |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, m in ((f"later (median of {max(args.repeats - 1, 1)})", med), ("first", first)):
        print(f"| 64 experts (4x256, ffn 1024) | {label} | {nbytes / 1e6:.0f} MB | {m['sync']:.3f} | "
              f"{m['async']:.3f} ({m['snap']:.3f} + {m['held']:.3f} + {m['async'] - m['snap'] - m['held']:.3f}) | "
              f"{m['async'] / m['sync']:.1%} | "
              f"{m['write']:.2f} | {m['steps']:.0f} | {m['step']:.3f} | {m['step_alone']:.3f} |")
    print("(target: async stall <= 15% of the synchronous save; the first async save also faults its staging "
          "buffers in, later saves reuse them)")
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=os.path.join("outputs", "bench_checkpoint"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--async", dest="async_", action="store_true",
                   help="the training stall per save, synchronous vs --async-save (64-expert model)")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="only this model (save/load table)")
    args = p.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    if args.async_:
        bench_async(args)
        return 0
    print("| model | bytes | ours save s | torch.save s | ours / torch | ours load s | torch.load s | ours / torch "
          "| ours save GB/s | ours load GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, spec in MODELS.items():
        if args.model is not None and name != args.model:
            continue
        model, opt = build(spec)
        root, flat = os.path.join(args.work_dir, "ours"), os.path.join(args.work_dir, "flat.pt")
        times = {k: [] for k in ("save", "tsave", "load", "tload")}
        for _ in range(args.repeats):
            shutil.rmtree(root, ignore_errors=True)
            t = time.perf_counter()
            checkpointing.save_checkpoint(root, 1, model, opt, None, None, {"consumed_samples": 0,
                                                                            "consumed_tokens": 0}, {})
            times["save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch_save_fsync({"model": model.state_dict(), "optimizer": opt.optimizer.state_dict()}, flat)  # torch's
            times["tsave"].append(time.perf_counter() - t)
            drop_caches()
            t = time.perf_counter()
            payload, ckpt_dir = checkpointing.load_dense(root)  # as training restores: every file verified, read once
            experts = checkpointing.read_expert_files(model, ckpt_dir)
            checkpointing.load_model_state(model, payload, ckpt_dir, experts=experts)
            checkpointing.load_optimizer_state(model, opt, payload, ckpt_dir, experts)
            times["load"].append(time.perf_counter() - t)
            drop_caches()
            t = time.perf_counter()
            sd = torch.load(flat, weights_only=True)
            model.load_state_dict(sd["model"])
            opt.optimizer.load_state_dict(sd["optimizer"])
            times["tload"].append(time.perf_counter() - t)
        m = {k: statistics.median(v) for k, v in times.items()}
        nbytes = dir_bytes(root)
        print(f"| {name} | {nbytes / 1e6:.0f} MB | {m['save']:.2f} | {m['tsave']:.2f} | {m['save'] / m['tsave']:.2f} | "
              f"{m['load']:.2f} | {m['tload']:.2f} | {m['load'] / m['tload']:.2f} | {nbytes / m['save'] / 1e9:.2f} | "
              f"{nbytes / m['load'] / 1e9:.2f} |")
        shutil.rmtree(root, ignore_errors=True)
        os.remove(flat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
