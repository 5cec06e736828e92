#!/usr/bin/env python
"""NVMe expert offload benchmark: decode tokens/s and offline-scoring requests/s at several resident fractions,
side by side with the all-resident model, naive on-demand reads, torch.load(mmap=True), and the physical bound.

    python tools/bench_offload.py [--work-dir /nvme/bench_offload] [--num-experts 32] [--repeats 3]

A random-init MoE GPT (default: 8 layers, hidden 512, 32 experts of ffn 2048 on every other layer, fp32: 1.07 GB
of experts) is saved as a checkpoint and an expert store in --work-dir (reused when present). Before each timed
run the page cache is dropped (as root). Every row is the median of --repeats runs, taken in rounds over all rows. The disk's read ceiling is
measured in the same run (O_DIRECT reads of the store through the aio handle, the way tools/nvme_tune.py reads).
Physical bound of a row: time = max(compute time of the all-resident model, bytes that must be read / disk GB/s),
where the bytes that must be read are the misses of an optimal (Belady) cache of the row's size on the row's own
sequence of expert requests (including the prompt's / first micro-batch's compulsory reads).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron import checkpointing  # noqa: E402
from megatron.checkpoint_tp import load_dense_whole, model_configs_from_checkpoint  # noqa: E402
from megatron.config import ModelConfig  # noqa: E402
from megatron.eval.scorer import LoglikelihoodScorer, Request  # noqa: E402
from megatron.model import GPTModel  # noqa: E402
from megatron.offload import build_offloaded_model, write_expert_store  # noqa: E402
from moe.config import MoEConfig  # noqa: E402
from moe.offload import OffloadConfig  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def prepare(args):
    ckpt, store, full = (os.path.join(args.work_dir, n) for n in ("ckpt", "store", "model_state.pt"))
    if args.load:  # a trained checkpoint: its routing and residual stream are what a user's model has
        ckpt = args.load
        if not os.path.isfile(full):
            payload, d = load_dense_whole(ckpt)
            mcfg, mc = model_configs_from_checkpoint(payload["configs"], d)
            model = GPTModel(mcfg, mc)
            checkpointing.load_model_state(model, payload, d)
            torch.save(model.state_dict(), full)
            del model
    elif not os.path.isfile(os.path.join(ckpt, checkpointing.TRACKER)):
        torch.manual_seed(0)
        cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
                          ffn_hidden_size=args.ffn_hidden_size, seq_length=256, max_position_embeddings=256,
                          padded_vocab_size=args.vocab_size, hidden_dropout=0.0, attention_dropout=0.0)
        moe = MoEConfig(num_experts=args.num_experts, expert_interval=2, topk=args.topk, drop_tokens=False)
        model = GPTModel(cfg, moe)
        configs = {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe), "tokenizer": {}}
        checkpointing.save_checkpoint(ckpt, 1, model, None, None, None, {}, configs)
        torch.save(model.state_dict(), full)  # the single-file state a torch.load(mmap=True) user would have
        del model
    if not os.path.isfile(os.path.join(store, "manifest.json")):
        write_expert_store(ckpt, store)
    return ckpt, store, full


def disk_ceiling(store_dir: str, chunk: int = 64 << 20) -> float:
    """GB/s of O_DIRECT reads of the whole data file through one aio handle (cold cache)."""
    from moe.ops.op_builder import AsyncIOBuilder

    h = AsyncIOBuilder().load().aio_handle(block_size=1 << 20, queue_depth=32, intra_op_parallelism=2)
    path = os.path.join(store_dir, "experts.bin")
    size = os.path.getsize(path)  # a multiple of 4096 (records are aligned)
    buf = h.new_cpu_locked_tensor(min(chunk, size), torch.empty(0, dtype=torch.uint8))
    drop_caches()
    t0 = time.perf_counter()
    for off in range(0, size, chunk):
        h.sync_pread(buf[:min(chunk, size - off)], path, off)
    return size / (time.perf_counter() - t0) / 1e9


class Loaded:
    """A model for one timed run: resident, offloaded or mmap'ed; .close() frees its threads."""

    def __init__(self, kind, ckpt, store, full, fraction=None, prefetch="gate", min_budget=False, device="cpu"):
        self.runtime = None
        payload, d = load_dense_whole(ckpt)
        mcfg, mc = model_configs_from_checkpoint(payload["configs"], d)
        if kind == "resident":
            self.model = GPTModel(mcfg, mc)
            checkpointing.load_model_state(self.model, payload, d)
            self.model.to(device)
        elif kind == "mmap":
            with torch.device("meta"):
                self.model = GPTModel(mcfg, mc)
            self.model.load_state_dict(torch.load(full, mmap=True, weights_only=True), assign=True)
            for m in self.model.modules():
                if hasattr(m, "init_buffers"):
                    m.init_buffers()
        else:
            from moe.offload import ExpertStore

            rb = ExpertStore.open(store).record_bytes
            budget = str(rb * mc.topk) if min_budget else f"{fraction}%"
            cfg = OffloadConfig(mode="nvme", directory=store, cache_bytes=budget, prefetch=prefetch)
            it = checkpointing.resolve_checkpoint_dir(d)[1]
            self.model, self.runtime = build_offloaded_model(mcfg, mc, payload, d, it, payload["configs"], cfg,
                                                             torch.device(device))
        self.model.eval()

    def close(self):
        if self.runtime is not None:
            self.runtime.close()


@torch.no_grad()
def decode(model, prompt, new_tokens: int) -> float:
    """Seconds for `new_tokens` greedy KV-cached steps after a prompt (the prompt's forward is not timed)."""
    cache = model.new_kv_cache()
    logits = model(prompt, kv_cache=cache).logits[:, -1]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, kv_cache=cache).logits[:, -1]
    return time.perf_counter() - t0


def scoring_requests(n: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for _ in range(n):  # LAMBADA-like: ~70-110 tokens of context, a 1-2 token target word
        ctx = torch.randint(1, vocab, (int(torch.randint(70, 110, (1,), generator=gen)),), generator=gen)
        cont = torch.randint(1, vocab, (int(torch.randint(1, 3, (1,), generator=gen)),), generator=gen)
        reqs.append(Request(tuple(ctx.tolist()), tuple(cont.tolist())))
    return reqs


def lambada_requests(load: str, n: int):
    """The first n LAMBADA requests encoded with the checkpoint's tokenizer, or None without the data."""
    from megatron.data.data_files import DataFileError, resolve
    from megatron.eval.tasks import build_task
    from megatron.tokenizer import build_tokenizer

    try:
        path = {"lambada": resolve("lambada")}
    except DataFileError:
        return None
    t = load_dense_whole(load)[0]["configs"]["tokenizer"]
    tok = build_tokenizer(t["tokenizer_type"], vocab_file=t.get("vocab_file"), merge_file=t.get("merge_file"),
                          tokenizer_model=t.get("tokenizer_model"))
    task = build_task("lambada")
    return [r for doc in task.load_docs(path)[:n] for r in task.encode(doc, tok)]


@torch.no_grad()
def score(model, reqs, micro_batch: int, block: int) -> float:
    scorer = LoglikelihoodScorer(model, 256, micro_batch, 16, layer_major_block=block)
    t0 = time.perf_counter()
    scorer.score(reqs)
    return time.perf_counter() - t0


def belady_misses(keys, capacity: int) -> int:
    """Misses of the optimal (Belady MIN) cache of `capacity` entries on the request sequence `keys`: the reads
    no policy can avoid, whatever it prefetches (a prefetched expert is still read)."""
    resident, misses = set(), 0
    for i, key in enumerate(keys):
        if key in resident:
            continue
        misses += 1
        if len(resident) >= capacity:
            def next_use(k):
                for j in range(i + 1, len(keys)):
                    if keys[j] == k:
                        return j
                return len(keys)
            resident.remove(max(resident, key=next_use))
        resident.add(key)
    return misses


def run_once(args, case) -> tuple:
    """(seconds, stats or None) of one cold run of `case` (a Case)."""
    m = Loaded(case.kind, *args.paths, fraction=case.fraction, prefetch=case.prefetch, min_budget=case.min_budget,
               device=args.device)
    try:
        if m.runtime is not None:
            m.runtime.cache.record_trace = True
        drop_caches()
        secs = case.fn(m.model)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        st = None
        if m.runtime is not None:
            st = m.runtime.summary()
            keys = [k for what, k in m.runtime.cache.stats.trace if what in ("hit", "miss")]
            st["min_bytes_read"] = belady_misses(keys, m.runtime.cache.num_slots) * m.runtime.cache.record_bytes
        return secs, st
    finally:
        m.close()


class Case:
    def __init__(self, section, name, frac, fn, kind, fraction=None, prefetch="gate", min_budget=False):
        self.section, self.name, self.frac, self.fn, self.kind = section, name, frac, fn, kind
        self.fraction, self.prefetch, self.min_budget = fraction, prefetch, min_budget
        self.runs = []

    def median(self):
        runs = sorted(self.runs, key=lambda r: r[0])
        return runs[len(runs) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=os.path.join("outputs", "bench_offload"))
    p.add_argument("--load", default=None, help="benchmark this MoE checkpoint instead of a random-init model "
                                                "(the model flags below are then ignored)")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--ffn-hidden-size", type=int, default=2048)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--fractions", default="100,50,25,12.5")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-scoring", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: the cache in GPU memory (reads staged in pinned memory)")
    p.add_argument("--output", default=None, help="write all figures as JSON here")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    os.makedirs(args.work_dir, exist_ok=True)
    args.paths = prepare(args)
    fractions = [float(f) if "." in f else int(f) for f in args.fractions.split(",")]
    if not drop_caches():
        print("note: not root, page cache not dropped (offload reads are O_DIRECT; the mmap row is warm)")
    gbps = disk_ceiling(args.paths[1])
    vocab, real = args.vocab_size, None
    if args.load:
        vocab = load_dense_whole(args.load)[0]["configs"]["model"]["padded_vocab_size"]
        real = lambada_requests(args.load, args.requests)
    prompt = torch.randint(1, vocab, (1, 16), generator=torch.Generator().manual_seed(1)).to(args.device)
    if real is not None:  # natural text: the first LAMBADA passage's first 16 tokens
        prompt = torch.tensor([list(real[0].context[:16])], device=args.device)
        print("trained checkpoint: prompts and requests are LAMBADA text")
    out = {"disk_GBps": gbps, "decode": [], "scoring": []}
    print(f"disk read ceiling (O_DIRECT, aio): {gbps:.2f} GB/s; {args.repeats} cold runs per row (rounds interleaved "
          f"over all rows), medians")

    n = args.new_tokens
    dec = lambda m: decode(m, prompt, n)  # noqa: E731
    cases = [Case("decode", "all-resident", "100%", dec, "resident")]
    for frac in fractions:
        for name, prefetch in (("offload, gate prefetch", "gate"), ("offload, LRU, no prefetch", "none")):
            cases.append(Case("decode", name, f"{frac}%", dec, "offload", fraction=frac, prefetch=prefetch))
    cases.append(Case("decode", "naive on-demand (k slots, no cache)", f"k={args.topk}", dec, "offload",
                      prefetch="none", min_budget=True))
    if args.device == "cpu":
        cases.append(Case("decode", "torch.load(mmap=True), cold page cache, no memory limit", "(OS)", dec, "mmap"))
    mb = args.micro_batch_size
    nb = -(-args.requests // mb)
    if not args.skip_scoring:
        reqs = real if real is not None else scoring_requests(args.requests, vocab)
        cases.append(Case("scoring", "all-resident", "100%", lambda m: score(m, reqs, mb, 1), "resident"))
        for frac in fractions:
            for name, block in (("offload, normal order", 1), ("offload, layer-major", nb)):
                cases.append(Case("scoring", name, f"{frac}%", lambda m, b=block: score(m, reqs, mb, b), "offload",
                                  fraction=frac, prefetch="none"))
    # repeats interleaved over all rows, so a noisy minute on a shared machine hits every row alike
    for r in range(args.repeats):
        for case in cases:
            case.runs.append(run_once(args, case))
        print(f"  round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    counts = {"decode": (n, "tokens_per_s", "tok/s"), "scoring": (args.requests, "requests_per_s", "req/s")}
    base = {c.section: c.median()[0] for c in cases if c.kind == "resident"}
    for section in ("decode", "scoring"):
        rows = [c for c in cases if c.section == section]
        if not rows:
            continue
        count, unit, short = counts[section]
        if section == "decode":
            print(f"\n## decode, batch 1, {n} new tokens (all-resident {count / base[section]:.1f} tok/s)")
        else:
            print(f"\n## offline scoring, {args.requests} {'LAMBADA' if real else 'LAMBADA-like'} requests, "
                  f"micro-batch {mb} (all-resident {count / base[section]:.1f} req/s); layer-major block = all "
                  f"{nb} micro-batches")
        print(f"| method | resident | {short} | x all-resident | bound {short} | x bound | hit rate | recall | "
              f"precision | MB/token | stall % |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in rows:
            secs, st = c.median()
            bound_s = max(base[section], (st["min_bytes_read"] / 1e9 / gbps) if st else 0.0)
            rate, bound = count / secs, count / bound_s
            rec = {"method": c.name, "resident": c.frac, unit: rate, "x_resident": base[section] / secs,
                   "bound": bound, "x_bound": rate / bound, "stats": st,
                   "all_seconds": sorted(r[0] for r in c.runs)}
            out[section].append(rec)
            f = (lambda v: "" if v is None else f"{100 * v:.0f}%")  # noqa: E731
            print(f"| {c.name} | {c.frac} | {rate:.2f} | {rec['x_resident']:.2f} | {bound:.2f} | {rec['x_bound']:.2f} | "
                  + (f"{f(st['hit_rate'])} | {f(st['prefetch_recall'])} | {f(st['prefetch_precision'])} | "
                     f"{st['bytes_read_per_token'] / 1e6:.2f} | {f(st['stall_fraction'])} |" if st else "| | | | |"))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
