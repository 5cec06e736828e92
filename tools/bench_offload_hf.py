#!/usr/bin/env python
"""`tools/bench_offload.py --hf`: NVMe expert offload of an imported Hugging Face MoE model, side by side with the route
a transformers user takes today (accelerate's disk offload) and with the all-resident models.

    python tools/bench_offload.py --hf [--work-dir outputs/bench_offload_hf] [--layers 8] [--hidden-size 1024]
        [--moe-ffn-hidden-size 384] [--num-experts 64] [--topk 8] [--fractions 100,50,25] [--new-tokens 16]
        [--requests 32] [--output figures.json]

A Qwen3-MoE-shaped model (transformers' Qwen3MoeConfig: every layer MoE, --num-experts experts, top --topk,
renormalised, QK-norm, GQA) with random weights is saved with save_pretrained as fp32 safetensors (reused when
present). Then, each step in a fresh process, with the page cache dropped before each (as root):
- conversion: tools/offload_experts.py --hf-dir (the expert store straight from the safetensors) -- seconds and GB/s
  of expert bytes, against the disk's O_DIRECT read GB/s measured in the same run; peak RSS;
- import: tools/convert_hf.py import -- seconds and peak RSS, against the largest single layer's bytes;
- decode (batch 1, a 16-token prompt, --new-tokens greedy KV-cached steps; the prompt is not timed) and offline
  scoring (--requests LAMBADA-shaped requests, micro-batch --micro-batch-size) for:
  (a) this project's model from the import with its experts offloaded to the store (cache of F% of the expert bytes,
      gate prefetch for decode, layer-major scoring), at every --fractions F;
  (b) transformers' AutoModelForCausalLM.from_pretrained(device_map="auto", max_memory={"cpu": dense bytes + F% of
      the expert bytes}, offload_folder=...): accelerate keeps what fits in memory and reads the rest from disk;
  (c) all-resident: this project's imported model and transformers' model, every weight in memory.
All compute is fp32 on the CPU (torch's threads: all cores). accelerate reads its offloaded weights through
the page cache, which no memory budget limits (the cache is dropped before each row, not during it); this
project's reads are O_DIRECT into the cache's own slots.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _bench():
    """tools/bench_offload.py as a module (its drop_caches, decode, score, disk_speed, peak_rss)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_offload_tool", os.path.join(HERE, "bench_offload.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", action="store_true")
    p.add_argument("--work-dir", default=os.path.join("outputs", "bench_offload_hf"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=384)
    p.add_argument("--num-experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--fractions", default="100,50,25")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--rows", default="convert,import,ours,hf,accelerate",
                   help="what to run (comma-separated subset of convert,import,ours,hf,accelerate)")
    p.add_argument("--output", default=None, help="write all figures as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one task, prints JSON
    return p


# ---------------------------------------------------------------------------------------------- the workers
def _hf_config(a: dict):
    import transformers

    h = a["hidden_size"]
    return transformers.Qwen3MoeConfig(
        vocab_size=a["vocab_size"], hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=a["moe_ffn"],
        num_hidden_layers=a["layers"], num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"],
        head_dim=h // a["heads"], num_experts=a["num_experts"], num_experts_per_tok=a["topk"], norm_topk_prob=True,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, architectures=["Qwen3MoeForCausalLM"])


def _make(task: dict) -> dict:
    import transformers

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(task["shape"]), dtype=torch.float32)
    with torch.no_grad():  # router and experts off their init scale, so routing is not uniform
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0.0, 0.05)
    model.save_pretrained(task["hf_dir"], max_shard_size="1GB")
    return {"seconds": time.perf_counter() - t0}


def _requests(n: int, vocab: int):
    return _bench().scoring_requests(n, vocab)


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (1, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _hf_decode(model, prompt, n: int):
    out = model(prompt, use_cache=True)
    past, logits, toks = out.past_key_values, out.logits[:, -1], []
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        toks.append(int(nxt))
        out = model(nxt, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return time.perf_counter() - t0, toks


@torch.no_grad()
def _ours_decode(model, prompt, n: int):
    cache = model.new_kv_cache()
    logits, toks = model(prompt, kv_cache=cache).logits[:, -1], []
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        toks.append(int(nxt))
        logits = model(nxt, kv_cache=cache).logits[:, -1]
    return time.perf_counter() - t0, toks


@torch.no_grad()
def _hf_score(model, reqs, mb: int) -> float:
    """Sum of log p(continuation | context) per request, micro-batches right-padded (what lm-eval's hf model does)."""
    import torch.nn.functional as F

    t0, scores = time.perf_counter(), []
    for i in range(0, len(reqs), mb):
        batch = reqs[i:i + mb]
        seqs = [list(r.context) + list(r.continuation) for r in batch]
        width = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s) - 1] = torch.tensor(s[:-1])
            mask[j, :len(s) - 1] = 1
        logp = F.log_softmax(model(ids, attention_mask=mask).logits.float(), -1)
        for j, (s, r) in enumerate(zip(seqs, batch)):
            k = len(r.continuation)
            pos = torch.arange(len(s) - 1 - k, len(s) - 1)
            scores.append(float(logp[j, pos, torch.tensor(s[-k:])].sum()))
    return time.perf_counter() - t0


def _run_model(task: dict) -> dict:
    b = _bench()
    a = task["shape"]
    prompt, reqs = _prompt(a["vocab_size"]), _requests(task["requests"], a["vocab_size"])
    t0 = time.perf_counter()
    info = {}
    if task["kind"] in ("hf", "accelerate"):
        import transformers

        kw = {}
        if task["kind"] == "accelerate":
            kw = dict(device_map="auto", max_memory={"cpu": int(task["budget_bytes"])},
                      offload_folder=task["offload_folder"])
        model = transformers.AutoModelForCausalLM.from_pretrained(task["hf_dir"], dtype=torch.float32, **kw).eval()
        where = getattr(model, "hf_device_map", None) or {}

        def device_of(name):  # the longest device_map prefix naming the parameter's module
            keys = [k for k in where if k == "" or name == k or name.startswith(k + ".")]
            return where[max(keys, key=len)] if keys else "cpu"

        info["disk_bytes"] = sum(4 * p.numel() for n, p in model.named_parameters() if device_of(n) == "disk")
        load_s = time.perf_counter() - t0
        decode_s, toks = _hf_decode(model, prompt, task["new_tokens"])
        score_s = _hf_score(model, reqs, task["micro_batch"])
    else:
        frac = task.get("fraction")
        loaded = b.Loaded("resident" if frac is None else "offload", task["ckpt"], task["store"], None,
                          fraction=frac, prefetch="gate")
        load_s = time.perf_counter() - t0
        try:
            decode_s, toks = _ours_decode(loaded.model, prompt, task["new_tokens"])
            if loaded.runtime is not None:
                info["decode_stats"] = _stats(loaded.runtime.summary())
        finally:
            loaded.close()
        del loaded  # before the next load: two models alive at once would inflate the peak RSS
        loaded = b.Loaded("resident" if frac is None else "offload", task["ckpt"], task["store"], None,
                          fraction=frac, prefetch="none")
        try:  # layer-major: one block of all micro-batches (each expert read once per block)
            nb = -(-len(reqs) // task["micro_batch"])
            score_s = b.score(loaded.model, reqs, task["micro_batch"], 1 if frac is None else nb)
            if loaded.runtime is not None:
                info["score_stats"] = _stats(loaded.runtime.summary())
        finally:
            loaded.close()
    return {"load_seconds": load_s, "decode_seconds": decode_s, "tokens": toks, "score_seconds": score_s, **info}


def _stats(s: dict) -> dict:
    return {k: s[k] for k in ("hit_rate", "prefetch_recall", "prefetch_precision", "bytes_read", "read_GBps",
                              "stall_fraction", "slots", "record_bytes", "expert_bytes_total") if k in s}


def _convert(task: dict) -> dict:
    import transformers  # noqa: F401  (its import, seconds on a busy machine, is not the conversion)

    from megatron.offload import write_hf_expert_store

    transformers.AutoConfig.from_pretrained(task["hf_dir"])
    t0 = time.perf_counter()
    store = write_hf_expert_store(task["hf_dir"], task["store"])
    return {"seconds": time.perf_counter() - t0, "store_bytes": store.total_bytes()}


def _import(task: dict) -> dict:
    from megatron.hf import import_hf

    t0 = time.perf_counter()
    import_hf(task["hf_dir"], task["ckpt"])
    return {"seconds": time.perf_counter() - t0}


def worker(task: dict) -> dict:
    torch.set_grad_enabled(False)
    fn = {"make": _make, "convert": _convert, "import": _import}.get(task["kind"], _run_model)
    out = fn(task)
    out["peak_rss"] = _bench().peak_rss()
    return out


# ---------------------------------------------------------------------------------------------- the parent
def run(task: dict, timeout: int = 900) -> dict:
    """One task in a fresh process after dropping the page cache; its JSON result."""
    _bench().drop_caches()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def _tensor_bytes(hf_dir: str):
    """(expert bytes, all bytes, largest decoder layer's bytes, largest single tensor's bytes) from the headers."""
    from safetensors import safe_open

    from megatron.hf.weights import SafetensorsReader

    r = SafetensorsReader(hf_dir)
    experts = total = 0
    layers, largest = {}, 0
    for shard in sorted(set(r.where.values())):
        with safe_open(os.path.join(hf_dir, shard), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 4  # fp32
                for s in sl.get_shape():
                    n *= s
                total += n
                largest = max(largest, n)
                if ".mlp.experts." in name:
                    experts += n
                if name.startswith("model.layers."):
                    i = int(name.split(".")[2])
                    layers[i] = layers.get(i, 0) + n
    return experts, total, max(layers.values()), largest


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    b = _bench()
    wd = os.path.abspath(args.work_dir)
    os.makedirs(wd, exist_ok=True)
    hf_dir, ckpt, store, offl = (os.path.join(wd, n) for n in ("hf", "ckpt", "store", "accelerate_offload"))
    shape = {"layers": args.layers, "hidden_size": args.hidden_size, "moe_ffn": args.moe_ffn_hidden_size,
             "num_experts": args.num_experts, "topk": args.topk, "heads": args.heads, "kv_heads": args.kv_heads,
             "vocab_size": args.vocab_size}
    rows = set(args.rows.split(","))
    root = b.drop_caches()
    print(f"page cache {'dropped before every step' if root else 'NOT dropped (not root)'}; "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}")
    out = {"shape": shape, "rows": []}
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        r = run({"kind": "make", "shape": shape, "hf_dir": hf_dir}, timeout=1800)
        if "error" in r:
            print(f"making the model failed: {r['error']}")
            return 1
        print(f"made the Hugging Face model in {r['seconds']:.0f} s")
    experts_b, total_b, layer_b, tensor_b = _tensor_bytes(hf_dir)
    out.update(expert_bytes=experts_b, total_bytes=total_b, largest_layer_bytes=layer_b)
    print(f"model: Qwen3MoeForCausalLM, {args.layers} layers, hidden {args.hidden_size}, {args.num_experts} experts "
          f"of ffn {args.moe_ffn_hidden_size}, top-{args.topk}, fp32: {total_b / 1e9:.2f} GB, experts "
          f"{experts_b / 1e9:.2f} GB ({100 * experts_b / total_b:.0f}%), largest layer {layer_b / 1e9:.3f} GB")
    write_gbps, read_gbps = b.disk_speed(wd, 1 << 30)
    out.update(disk_read_GBps=read_gbps, disk_write_GBps=write_gbps)
    print(f"disk (O_DIRECT, aio, 1 GiB, cold): read {read_gbps:.2f} GB/s, write {write_gbps:.2f} GB/s")

    if "convert" in rows or not os.path.isfile(os.path.join(store, "manifest.json")):
        shutil.rmtree(store, ignore_errors=True)
        r = run({"kind": "convert", "hf_dir": hf_dir, "store": store})
        out["convert"] = r
        if "error" in r:
            print(f"conversion failed: {r['error']}")
        else:
            gbps = r["store_bytes"] / r["seconds"] / 1e9
            print(f"conversion (offload_experts.py --hf-dir): {r['store_bytes'] / 1e9:.2f} GB of experts in "
                  f"{r['seconds']:.1f} s = {gbps:.2f} GB/s, {100 * gbps / read_gbps:.0f}% of the disk's read GB/s "
                  f"(target >= 50%); peak RSS {r['peak_rss'] / 1e9:.2f} GB")
    if "import" in rows or not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        shutil.rmtree(ckpt, ignore_errors=True)
        r = run({"kind": "import", "hf_dir": hf_dir, "ckpt": ckpt})
        out["import"] = r
        if "error" in r:
            print(f"import failed: {r['error']}")
        else:
            print(f"import (convert_hf.py import): {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB = "
                  f"largest layer ({layer_b / 1e9:.2f} GB) + {(r['peak_rss'] - layer_b) / 1e9:.2f} GB "
                  f"(target <= 1.5 GB above it)")

    fractions = [float(f) for f in args.fractions.split(",")]
    common = {"shape": shape, "requests": args.requests, "new_tokens": args.new_tokens,
              "micro_batch": args.micro_batch_size, "hf_dir": hf_dir, "ckpt": ckpt, "store": store}
    dense_b = total_b - experts_b
    tasks = []
    if "ours" in rows:
        tasks.append(("(c) all-resident, this project (imported)", "100%", {"kind": "ours"}))
    if "hf" in rows:
        tasks.append(("(c) all-resident, transformers", "100%", {"kind": "hf"}))
    for f in fractions:
        if "ours" in rows:
            tasks.append(("(a) this project: NVMe offload, cache + prefetch", f"{f:g}%",
                          {"kind": "ours", "fraction": f}))
        if "accelerate" in rows:
            tasks.append(("(b) transformers + accelerate disk offload", f"{f:g}%",
                          {"kind": "accelerate", "budget_bytes": int(dense_b + f / 100 * experts_b),
                           "offload_folder": offl}))
    print(f"\n## batch-1 decode ({args.new_tokens} new tokens after a 16-token prompt) and offline scoring "
          f"({args.requests} LAMBADA-shaped requests, micro-batch {args.micro_batch_size}); fp32, one cold run each")
    print("| method | expert bytes resident | decode tok/s | scoring req/s | load s | peak RSS GB | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    ref_tokens = None
    for name, frac, extra in tasks:
        shutil.rmtree(offl, ignore_errors=True)
        r = run({**common, **extra})
        r.update(method=name, resident=frac)
        out["rows"].append(r)
        if "error" in r:
            print(f"| {name} | {frac} | failed | failed | | | {r['error'][:300]} |")
            continue
        notes = []
        if ref_tokens is None:
            ref_tokens = r["tokens"]
        notes.append(f"greedy tokens = first row's: {sum(x == y for x, y in zip(r['tokens'], ref_tokens))}/"
                     f"{len(ref_tokens)}")
        st = r.get("decode_stats")
        if st:
            notes.append(f"decode hit {100 * st['hit_rate']:.0f}%, prefetch recall "
                         f"{100 * (st['prefetch_recall'] or 0):.0f}%, stall {100 * (st['stall_fraction'] or 0):.0f}%")
        if "disk_bytes" in r:
            notes.append(f"{100 * r['disk_bytes'] / experts_b:.0f}% of the expert bytes' worth of weights on disk")
        print(f"| {name} | {frac} | {args.new_tokens / r['decode_seconds']:.2f} | "
              f"{args.requests / r['score_seconds']:.2f} | {r['load_seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | "
              f"{'; '.join(notes)} |", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
