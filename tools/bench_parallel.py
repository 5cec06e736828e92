"""Pipeline vs data / tensor / context parallelism on CPU ranks (gloo): tokens/s and peak memory per rank, the
measured pipeline bubble against 1F1B's (p-1)/(m+p-1), and activation memory per rank at PP=2 vs PP=1.

    python tools/bench_parallel.py                          # all three tables, the 8-layer h512 MoE config
    python tools/bench_parallel.py --only throughput --world 4
    python tools/bench_parallel.py --seq-length 128 --steps 2 # a smaller step on a busy machine

Every variant runs megatron.training.train_step (forward, backward, gradient reduction, clip, AdamW) in its own
fresh processes (one gloo rank each, --threads threads per rank), on synthetic tokens, after --warmup steps; the
median of --steps timed steps is reported. Per-rank peak memory is the process's peak RSS (VmHWM: parameters,
gradients, Adam state, activations, communication buffers). Activation memory is measured, not modelled: the
peak over a step of the bytes autograd holds for the backward (saved-tensor hooks; parameters excluded), on the
rank that holds the most (the first stage under 1F1B: it has the most micro-batches in flight).
Bubble: each rank's idle fraction over the timed steps, from the kernel's accounting of its main thread
(/proc/self/schedstat; one compute thread per rank): busy = CPU time, waiting-to-run = run-queue time (another job
holds the core: contention, not the pipeline), idle = wall - busy - waiting-to-run (blocked in a receive or a
collective), bubble = idle / (busy + idle). It includes P2P time and stage imbalance (the LM head and the embedding
sit on the end stages), and is compared with 1F1B's (p-1)/(m+p-1): the busiest stage's idle share is the bubble,
what the other stages idle beyond it is imbalance.
Numbers from a shared machine are contended (other jobs take cores): compare variants of one run only.
On one GPU none of this shows scaling (one device runs one rank): see docs/design.md for the formulas.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

MOE_H512 = ["--num-layers", "8", "--hidden-size", "512", "--num-attention-heads", "8", "--num-experts", "8",
            "--topk", "2", "--expert-interval", "2", "--disable-moe-token-dropping", "--hidden-dropout", "0",
            "--attention-dropout", "0"]
VOCAB = 50304


class _Held:
    """A saved tensor, counted while autograd keeps it (freed when the graph releases it)."""
    live = peak = 0

    def __init__(self, t, nbytes):
        self.t, self.nbytes = t, nbytes
        _Held.live += nbytes
        _Held.peak = max(_Held.peak, _Held.live)

    def __del__(self):
        _Held.live -= self.nbytes


def _rss_peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _schedstat():
    """(CPU seconds, run-queue seconds) of this process's main thread so far."""
    with open("/proc/self/schedstat") as f:
        cpu_ns, wait_ns, _ = f.read().split()
    return int(cpu_ns) / 1e9, int(wait_ns) / 1e9


def child(spec: dict) -> None:
    """One variant on this rank: build from flags, warm up, time steps; rank 0 prints every rank's JSON."""
    import torch.distributed as dist

    from megatron import parallel_state
    from megatron.arguments import parse_args, train_config_from_args, validate
    from megatron.training import setup_train_state, train_step

    torch.set_num_threads(spec["threads"])
    _, world, device = parallel_state.init_distributed("gloo")
    cfg = train_config_from_args(parse_args(spec["argv"]), VOCAB, world)
    validate(cfg, world)
    par = cfg.parallel
    groups = parallel_state.initialize(par.tensor_model_parallel_size, cfg.moe.ep_size if cfg.moe else (1,),
                                       cp_size=par.context_parallel_size, pp_size=par.pipeline_model_parallel_size)
    st = setup_train_state(cfg, groups, device)
    g = torch.Generator().manual_seed(groups.dp_rank)
    mbs, seq = cfg.data.micro_batch_size, cfg.data.seq_length

    def batches():
        while True:
            yield {"text": torch.randint(0, 50257, (mbs, seq + 1), generator=g)}
    it = batches()
    for _ in range(spec["warmup"]):
        train_step(st, it)
    params = {p.data_ptr() for p in st.model.parameters()}

    def pack(t):
        return _Held(t, 0 if t.data_ptr() in params else t.numel() * t.element_size())
    times, sched = [], None
    for i in range(spec["steps"]):
        if i == 1:
            sched = (_schedstat(), time.perf_counter())
        t0 = time.perf_counter()
        if i == 0:  # the activation peak of one step (the hooks cost a little time: not a timed step's)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
                train_step(st, it)
            continue
        train_step(st, it)
        times.append(time.perf_counter() - t0)
    (cpu0, rq0), t0 = sched
    cpu1, rq1 = _schedstat()
    wall = time.perf_counter() - t0
    idle = max(0.0, wall - (cpu1 - cpu0) - (rq1 - rq0))
    mine = {"rank": groups.rank, "step_s": statistics.median(times), "rss_peak_mib": _rss_peak_mib(),
            "idle_fraction": idle / max(idle + cpu1 - cpu0, 1e-9), "runqueue_fraction": (rq1 - rq0) / wall,
            "activation_peak_mib": _Held.peak / 2**20,
            "tokens_per_s": cfg.data.global_batch_size * seq / statistics.median(times)}
    out = [None] * world
    if world > 1:
        dist.all_gather_object(out, mine)
        dist.destroy_process_group()
    else:
        out = [mine]
    if groups.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def run(argv: list, world: int, args) -> list:
    """`argv` on `world` fresh processes; every rank's result."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"argv": argv, "threads": args.threads, "warmup": args.warmup, "steps": args.steps + 1}
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (o, e) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"benchmark child failed ({p.returncode}):\n{e[-3000:]}")
    return json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def _per_rank(results: list, key: str, digits: int = 0) -> str:
    return " / ".join(f"{r[key]:.{digits}f}" for r in results)


def base(args, world_dp: int, micro: int) -> list:
    return MOE_H512 + ["--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
                       "--micro-batch-size", "1", "--global-batch-size", str(micro * world_dp),
                       "--train-iters", "1000", "--lr", "1e-4"]


def throughput(args) -> None:
    w = args.world
    variants = {"DP": [], "PP": ["--pipeline-model-parallel-size", str(w)], "TP": ["--tensor-model-parallel-size", str(w)],
                "CP": ["--context-parallel-size", str(w)]}
    print(f"\n### {w} ranks, global batch {args.micro} sequences of {args.seq_length} tokens (PP/TP/CP={w}: "
          f"{args.micro} micro-batches of 1 per step; DP={w}: {args.micro // w} per rank)")
    print("| variant | tokens/s | step s | peak RSS MiB per rank | activation peak MiB per rank |")
    print("|---|---|---|---|---|")
    for name, extra in variants.items():
        dp = w if name == "DP" else 1
        micro = args.micro // dp if name == "DP" else args.micro  # the same global batch for every variant
        res = run(base(args, dp, micro) + extra, w, args)
        print(f"| {name}={w} | {res[0]['tokens_per_s']:.0f} | {res[0]['step_s']:.2f} | "
              f"{_per_rank(res, 'rss_peak_mib')} | {_per_rank(res, 'activation_peak_mib')} |", flush=True)


def bubble(args) -> None:
    p = 2
    print(f"\n### pipeline bubble, PP={p} (1F1B) {args.pp_extra}: idle fraction of each rank's step (schedstat: "
          f"this rank's own run-queue time removed)")
    print("| m | step s | idle rank 0 / rank 1 | run-queue share rank 0 / rank 1 | 1F1B (p-1)/(m+p-1) | "
          "bottleneck idle / formula | max idle / formula |")
    print("|---|---|---|---|---|---|---|")
    for m in args.micro_batches:
        res = run(base(args, 1, m) + ["--pipeline-model-parallel-size", str(p)] + args.pp_extra.split(), p, args)
        formula = (p - 1) / (m + p - 1)
        idle = [r["idle_fraction"] for r in res]  # the busiest stage sets the pace: its idle time is the bubble;
        print(f"| {m} | {res[0]['step_s']:.2f} | {_per_rank(res, 'idle_fraction', 3)} | "  # the rest is imbalance
              f"{_per_rank(res, 'runqueue_fraction', 2)} | {formula:.3f} | {min(idle) / formula:.2f}x | "
              f"{max(idle) / formula:.2f}x |", flush=True)


def activations(args) -> None:
    m = args.micro
    print(f"\n### activation memory per rank, {m} micro-batches (peak bytes saved for the backward in one step)")
    one = run(base(args, 1, m), 1, args)[0]
    two = run(base(args, 1, m) + ["--pipeline-model-parallel-size", "2"], 2, args)
    worst = max(r["activation_peak_mib"] for r in two)
    print(f"| PP=1 | {one['activation_peak_mib']:.0f} MiB |\n| PP=2 (per rank) | "
          f"{_per_rank(two, 'activation_peak_mib')} MiB | ratio (max rank / PP=1) "
          f"{worst / one['activation_peak_mib']:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["throughput", "bubble", "activations"], default=None)
    ap.add_argument("--world", type=int, default=2, help="ranks for the throughput table (2 or 4)")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8, help="micro-batches per step (throughput, activations)")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16], help="m for the bubble table")
    ap.add_argument("--pp-extra", default="", help="extra flags of the bubble runs, e.g. "
                    "'--decoder-first-pipeline-num-layers 6' (the last stage also holds the LM head)")
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0
    print("config: " + " ".join(MOE_H512) + f" | seq {args.seq_length} | {args.threads} thread(s)/rank | "
          f"median of {args.steps} steps after {args.warmup} warmup | numbers on a shared machine are contended")
    for name, fn in (("throughput", throughput), ("bubble", bubble), ("activations", activations)):
        if args.only in (None, name):
            fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
