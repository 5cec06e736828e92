#!/usr/bin/env python
"""Zero-shot LAMBADA + PIQA throughput: the project's route (tools/eval_zeroshot.py's run_zeroshot) against
lm-evaluation-harness with the `megatron_moe` model (megatron/eval/harness.py), in one run, same batch size.

    python tools/bench_eval.py [--load CKPT] [--limit 200] [--micro-batch-size 16] [--repeats 3]

Without --load a demo-like checkpoint is written to a temporary directory (examples_moe/demo.sh's model: 4 layers,
hidden 128, 4 heads, window 256, 8 experts top-1 on every 2nd layer, GPT-2 BPE; random weights: speed does not
depend on training). Each repeat runs both routes end to end in this process (model load, documents, requests,
scoring, metrics with the same number of bootstrap resamples), alternating which goes first; the table gives
medians of examples/s over LAMBADA + PIQA (documents, not requests) in wall and in CPU time (this process and its
children: on a shared machine the wall time mostly measures the neighbours), the ratios harness/native (target
<= 1.25), and the harness route's wall time inside the model (loglikelihood) beside its framework time. The two routes' metric
values are checked equal (accuracies identical, perplexity to 1e-6 relative).
"""
import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time


import torch


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (lm_eval's bootstrap pool): on a shared, oversubscribed
    machine the wall time mostly measures the neighbours; the CPU time measures each route's own work."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def demo_checkpoint(root: str) -> str:
    from megatron import checkpointing
    from megatron.config import ModelConfig
    from megatron.data.data_files import resolve
    from moe.config import MoEConfig
    from megatron.model import GPTModel

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, seq_length=256,
                      max_position_embeddings=256, padded_vocab_size=50304, hidden_dropout=0.0, attention_dropout=0.0)
    moe = MoEConfig(num_experts=8, expert_interval=2, topk=1, train_capacity_factor=1.25, eval_capacity_factor=2.0)
    configs = {"model": dataclasses.asdict(cfg), "moe": dataclasses.asdict(moe),
               "tokenizer": {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(resolve("gpt2-vocab")),
                             "merge_file": str(resolve("gpt2-merges")), "tokenizer_model": None,
                             "make_vocab_size_divisible_by": 128}}
    checkpointing.save_checkpoint(root, 1, GPTModel(cfg, moe), None, None, None, {}, configs)
    return root


def run_native(load, data_dir, limit, mbs, boot):
    from megatron.eval.runner import EvalConfig, run_zeroshot

    start, cpu = time.perf_counter(), cpu_seconds()
    report = run_zeroshot(EvalConfig(load=load, data_dir=data_dir, limit=limit, micro_batch_size=mbs,
                                     progress=False, bootstrap_iters=boot))
    secs, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return secs, cpu, {(r["task"], r["metric"]): r["value"] for r in report["results"]}


def run_harness(load, include, limit, mbs, boot):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megatron.eval.harness as harness

    inside = [0.0]
    original = harness.MegatronMoELM.loglikelihood

    def timed(self, requests, disable_tqdm=False):
        t = time.perf_counter()
        try:
            return original(self, requests, disable_tqdm=True)
        finally:
            inside[0] += time.perf_counter() - t

    harness.MegatronMoELM.loglikelihood = timed
    try:
        start, cpu = time.perf_counter(), cpu_seconds()
        res = lm_eval.simple_evaluate(model="megatron_moe", model_args=f"load={load},batch_size={mbs}",
                                      tasks=["lambada_openai_local", "piqa_local"], limit=limit,
                                      bootstrap_iters=boot, task_manager=TaskManager(include_path=include,
                                                                                    include_defaults=False))
        secs, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        harness.MegatronMoELM.loglikelihood = original
    r = res["results"]
    values = {("lambada", "acc"): r["lambada_openai_local"]["acc,none"],
              ("lambada", "ppl"): r["lambada_openai_local"]["perplexity,none"],
              ("piqa", "acc"): r["piqa_local"]["acc,none"], ("piqa", "acc_norm"): r["piqa_local"]["acc_norm,none"]}
    return secs, cpu, inside[0], values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default=None, help="checkpoint (default: a demo-like random MoE checkpoint)")
    p.add_argument("--data-dir", default=None, help="folder with lambada/, piqa/, gpt2/ (default: shared data)")
    p.add_argument("--limit", type=int, default=200, help="documents per task")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="resamples for stderrs, both routes")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_grad_enabled(False)
    import logging

    logging.disable(logging.WARNING)
    import megatron.eval.harness as harness

    with tempfile.TemporaryDirectory() as tmp:
        load = args.load or demo_checkpoint(os.path.join(tmp, "ckpt"))
        include = harness.local_task_configs(os.path.join(tmp, "tasks"), args.data_dir)
        n_docs = 2 * args.limit
        native, harn, inside, native_cpu, harn_cpu = [], [], [], [], []
        for rep in range(args.repeats):
            order = ("native", "harness") if rep % 2 == 0 else ("harness", "native")
            for route in order:
                if route == "native":
                    secs, cpu, nv = run_native(load, args.data_dir, args.limit, args.micro_batch_size,
                                               args.bootstrap_iters)
                    native.append(secs)
                    native_cpu.append(cpu)
                else:
                    secs, cpu, ins, hv = run_harness(load, include, args.limit, args.micro_batch_size,
                                                     args.bootstrap_iters)
                    harn.append(secs)
                    harn_cpu.append(cpu)
                    inside.append(ins)
            for key in nv:
                same = hv[key] == nv[key] if key[1] != "ppl" else abs(hv[key] / nv[key] - 1) <= 1e-6
                if not same:
                    print(f"warning: {key} differs: native {nv[key]} harness {hv[key]}", file=sys.stderr)
    med_n, med_h, med_in = statistics.median(native), statistics.median(harn), statistics.median(inside)
    print(f"checkpoint: {args.load or 'demo-like random MoE (4 layers, h128, 8 experts top-1)'}; "
          f"{args.limit} LAMBADA + {args.limit} PIQA documents, micro-batch {args.micro_batch_size}, "
          f"{args.repeats} repeats (medians), CPU threads {torch.get_num_threads()}")
    cpu_n, cpu_h = statistics.median(native_cpu), statistics.median(harn_cpu)
    print("| route | wall s | examples/s (wall) | CPU s | examples/CPU-s | wall s in model |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| tools/eval_zeroshot.py (run_zeroshot) | {med_n:.1f} | {n_docs / med_n:.2f} | {cpu_n:.1f} | "
          f"{n_docs / cpu_n:.2f} | - |")
    print(f"| lm_eval + megatron_moe | {med_h:.1f} | {n_docs / med_h:.2f} | {cpu_h:.1f} | {n_docs / cpu_h:.2f} | "
          f"{med_in:.1f} |")
    for what, ratio in (("wall", med_h / med_n), ("CPU", cpu_h / cpu_n)):
        print(f"harness/native {what} time ratio: {ratio:.2f}x (target <= 1.25x): "
              f"{'met' if ratio <= 1.25 else 'MISSED'}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"values equal: lambada acc {nv[('lambada', 'acc')]:.4f} ppl {nv[('lambada', 'ppl')]:.2f}, "
          f"piqa acc {nv[('piqa', 'acc')]:.4f} acc_norm {nv[('piqa', 'acc_norm')]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
