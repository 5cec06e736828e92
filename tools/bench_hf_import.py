#!/usr/bin/env python
"""Peak RSS and wall time of tools/convert_hf.py import and export on a random Qwen3-MoE-shaped model written
straight to bf16 safetensors shards (no transformers model is built, so the writer's memory does not count).

    python tools/bench_hf_import.py --out /tmp/bench_hf [--layers 8 --hidden 1024 --experts 32 --moe-ffn 512]
        [--vocab 32000] [--skip-export]

Each conversion runs in its own process; peak RSS is that process's VmHWM (not ru_maxrss: Linux carries the
forking parent's RSS across exec into it, so a bench process that just wrote GBs of shards would count). Prints one JSON line: the largest
layer (a decoder layer or the embedding, fp32 as imported), the dense (non-expert) part, and for the import its peak
RSS and that minus the largest layer (issue 26's target: <= 1.5 GB).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_model(out: str, a) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.Qwen3MoeConfig(hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                                      moe_intermediate_size=a.moe_ffn, num_hidden_layers=a.layers,
                                      num_attention_heads=16, num_key_value_heads=4, head_dim=a.hidden // 16,
                                      num_experts=a.experts, num_experts_per_tok=8, vocab_size=a.vocab,
                                      norm_topk_prob=True, max_position_embeddings=256)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    os.makedirs(out, exist_ok=True)
    cfg.save_pretrained(out)
    h, d, g = a.hidden, a.hidden // 16, torch.Generator().manual_seed(0)

    def tensors():
        yield "model.embed_tokens.weight", (a.vocab, h)
        for i in range(a.layers):
            p = f"model.layers.{i}."
            for n, s in (("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
                         ("self_attn.q_proj.weight", (16 * d, h)), ("self_attn.k_proj.weight", (4 * d, h)),
                         ("self_attn.v_proj.weight", (4 * d, h)), ("self_attn.o_proj.weight", (h, 16 * d)),
                         ("self_attn.q_norm.weight", (d,)), ("self_attn.k_norm.weight", (d,)),
                         ("mlp.gate.weight", (a.experts, h))):
                yield p + n, s
            for e in range(a.experts):
                for n, s in (("gate_proj", (a.moe_ffn, h)), ("up_proj", (a.moe_ffn, h)), ("down_proj", (h, a.moe_ffn))):
                    yield f"{p}mlp.experts.{e}.{n}.weight", s
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (a.vocab, h)

    where, shard, size, n, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        where.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in tensors():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= a.shard_mb * 2 ** 20:
            flush()
    if shard:
        flush()
    json.dump({"metadata": {"total_size": total}, "weight_map": where},
              open(os.path.join(out, "model.safetensors.index.json"), "w"))
    return {"hf_bytes": total, "shards": n}


def _run(args) -> dict:
    code = ("import resource, sys, time; sys.path.insert(0, %r); sys.argv = ['convert_hf'] + %r; "
            "import importlib.util as u; s = u.spec_from_file_location('c', %r); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); t = time.time(); rc = m.main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('RESULT', rc, time.time() - t, hwm)"
            % (ROOT, args, os.path.join(ROOT, "tools", "convert_hf.py")))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
    if not line:
        raise SystemExit(p.stderr[-2000:])
    _, rc, secs, kb = line[0].split()
    return {"rc": int(rc), "seconds": round(float(secs), 1), "peak_rss_gb": round(int(kb) / 2 ** 20, 2),
            "process_seconds": round(time.time() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--moe-ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=500)
    p.add_argument("--skip-export", action="store_true", help="measure the import only")
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    hf_dir, ck, out = (os.path.join(a.out, x) for x in ("hf", "ck", "export"))
    made = _write_model(hf_dir, a)
    h, f, e = a.hidden, a.moe_ffn, a.experts
    # the largest "layer": a decoder layer (experts + q/k/v/o (GQA 16:4) + router) or the embedding (= the head)
    largest_layer_fp32 = max(4 * (e * 3 * h * f + 5 * h * h // 2 + e * h), 4 * a.vocab * h)
    dense_fp32 = 4 * (2 * a.vocab * h + a.layers * (5 * h * h // 2 + e * h))
    res = {**made, "largest_layer_fp32_gb": round(largest_layer_fp32 / 2 ** 30, 3),
           "dense_part_fp32_gb": round(dense_fp32 / 2 ** 30, 3),
           "model_fp32_gb": round(made["hf_bytes"] * 2 / 2 ** 30, 2),
           "import": _run(["import", "--hf-dir", hf_dir, "--save", ck])}
    res["import"]["above_largest_layer_gb"] = round(res["import"]["peak_rss_gb"] - largest_layer_fp32 / 2 ** 30, 2)
    if not a.skip_export:
        res["export"] = _run(["export", "--load", ck, "--save", out, "--dtype", "bfloat16",
                              "--max-shard-size-gb", "0.5"])
    res["self_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
