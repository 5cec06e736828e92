"""Benchmark the full training step (forward, backward, AdamW) of a GPT config: tokens/s and MFU.

MFU is measured against the fp32 GEMM peak measured in the same run (best of several n x n matmuls),
with Megatron's FLOP accounting (megatron/flops.py). Variants run interleaved in rounds so machine noise
hits them alike; medians are reported.

    python tools/bench_train.py                      # the issue's reference config (8L, h512, s512, b4)
    python tools/bench_train.py --variants eager,compile --rounds 5
    python tools/bench_train.py --kd                 # staged-KD student step vs the plain student step and the
                                                     # teacher's forward alone (target: kd <= 1.15 x (student + teacher))
    python tools/bench_train.py --recompute --zero-stage 1   # memory/time of activation recomputation and ZeRO

--recompute and --zero-stage N compare, for the MoE demo config and the 8-layer h512 config, full training steps
(megatron.training.train_step: forward, backward, gradient reduction, clip, AdamW) with and without each, every
variant in its own subprocess so its peak RSS (/proc/self/status VmHWM) is its own:
- recompute: none / full (uniform, 1 layer per checkpoint: --checkpoint-activations) / selective, one process;
  activation memory = bytes saved for the backward during one forward, counted with torch's saved-tensor hooks
  (parameters excluded; what a checkpoint keeps, its inputs, included), inside the transformer layers (what
  recomputation acts on) and in all (the LM head's [tokens, vocab] gradient buffer is kept either way);
- ZeRO: stage 0 vs N at DP=2 (two gloo processes, one thread each): per-rank optimizer-state bytes (the Adam state
  tensors) and peak RSS of rank 0.
Variants run interleaved over --rounds; step time is the median over rounds of each round's median.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


import torch

from megatron.config import ModelConfig
from megatron.flops import flops_per_token, measure_gemm_peak
from megatron.model import GPTModel
from megatron.optimizer import build_optimizer
from megatron.config import OptimizerConfig


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--ffn-hidden-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="default 4; with --recompute/--zero-stage it replaces both configs' micro-batch size (a "
                        "smaller step on a busy machine; activation memory scales with it)")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--hidden-dropout", type=float, default=0.0)
    p.add_argument("--attention-dropout", type=float, default=0.0)
    p.add_argument("--num-experts", type=int, default=1, help=">1: MoE every --expert-interval layers")
    p.add_argument("--expert-interval", type=int, default=2)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--variants", default="plain,fused",
                   help="comma list of: plain (unfused LM-head cross entropy, the reference), fused (our default "
                        "step), compile (fused + torch.compile, the --compile flag)")
    p.add_argument("--kd", action="store_true",
                   help="distillation: time the student step without KD, with staged KD active (teacher forward + "
                        "fused KD loss), the unfused KD step it replaces, and the teacher's forward alone")
    p.add_argument("--teacher-num-layers", type=int, default=None, help="--kd: teacher depth (default: student's)")
    p.add_argument("--teacher-num-experts", type=int, default=None,
                   help="--kd: teacher experts per MoE layer (default: student's)")
    p.add_argument("--kd-temp", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--recompute", action="store_true",
                   help="compare no / full / selective activation recomputation (MoE demo and 8L h512 configs)")
    p.add_argument("--zero-stage", type=int, choices=[1, 2], default=None,
                   help="compare ZeRO stage 0 with this stage at DP=2 (MoE demo and 8L h512 configs)")
    p.add_argument("--configs", default="moe-demo,h512", help="for --recompute/--zero-stage: comma list of " +
                   ", ".join(CONFIGS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one variant, JSON spec
    return p.parse_args()


# The two configs the issue names: examples_moe/demo.sh's MoE GPT and the 8-layer h512 reference (GPT-2 vocabulary,
# Megatron's default dropout 0.1, so attention dropout is on and selective recompute has work to do).
CONFIGS = {
    "moe-demo": ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "256",
                 "--micro-batch-size", "8", "--num-experts", "8", "--topk", "1"],
    "h512": ["--num-layers", "8", "--hidden-size", "512", "--num-attention-heads", "8", "--seq-length", "512",
             "--micro-batch-size", "4"],
}
RECOMPUTE = {"none": [], "full": ["--checkpoint-activations"], "selective": ["--recompute-granularity", "selective"]}


def build(args, variant):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                      num_attention_heads=args.num_attention_heads,
                      ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size, seq_length=args.seq_length,
                      max_position_embeddings=args.seq_length, padded_vocab_size=args.vocab_size,
                      hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout)
    moe_cfg = None
    if args.num_experts > 1:
        from moe.config import MoEConfig
        moe_cfg = MoEConfig(num_experts=(args.num_experts,), expert_interval=args.expert_interval, topk=args.topk)
    model = GPTModel(cfg, moe_cfg)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-4))
    fwd = torch.compile(model) if variant == "compile" else model
    return cfg, moe_cfg, model, fwd, opt, variant == "plain"


def step(fwd, opt, tokens, labels, moe_cfg, plain):
    opt.zero_grad(set_to_none=True)
    if plain:  # logits materialised, then F.cross_entropy: what a plain PyTorch GPT does
        out = fwd(tokens)
        loss = torch.nn.functional.cross_entropy(out.logits.view(-1, out.logits.size(-1)), labels.view(-1))
    else:
        out = fwd(tokens, labels)
        loss = out.loss.mean()
    if moe_cfg is not None and out.moe_stats:
        loss = loss + moe_cfg.loss_coeff * sum(s.aux_loss for s in out.moe_stats)
    loss.backward()
    opt.step_with_ready_grads()  # the update alone (no clip), as before the optimizer interface


def build_teacher(args):
    """A frozen TeacherRunner of the --teacher-* architecture (random weights: timing only)."""
    from moe.distill import DistillConfig, TeacherRunner

    t_args = argparse.Namespace(**vars(args))
    t_args.num_layers = args.teacher_num_layers or args.num_layers
    t_args.num_experts = args.teacher_num_experts or args.num_experts
    _, _, model, _, _, _ = build(t_args, "fused")
    return TeacherRunner(model, DistillConfig(kd=True, load_teacher="unused", kd_temp=args.kd_temp))


def kd_step(fwd, opt, tokens, labels, moe_cfg, teacher, temp, fused):
    """One staged-KD student step as megatron/training.py runs it (fused), or the unfused path it replaced:
    student logits, F.cross_entropy and moe.distill.kd_loss on [tokens, vocab] tensors, the teacher under no_grad."""
    from megatron.model.fused_lm_loss import DistillTarget
    from moe.distill import kd_loss

    opt.zero_grad(set_to_none=True)
    mask = torch.ones(labels.shape)
    if fused:
        target = DistillTarget(teacher.forward(tokens), mask, temp, 1.0, 1.0, None)
        out = fwd(tokens, labels, distill_target=target)
        loss = out.kd_total
    else:
        out = fwd(tokens, labels, return_logits=True)
        with torch.no_grad():
            t_logits = teacher.model(tokens).logits
        lm = (out.loss * mask).sum() / mask.sum()
        loss, _ = kd_loss(lm, out.logits, t_logits, mask, teacher.cfg)
    if moe_cfg is not None and out.moe_stats:
        loss = loss + moe_cfg.loss_coeff * sum(s.aux_loss for s in out.moe_stats)
    loss.backward()
    opt.step_with_ready_grads()  # the update alone (no clip), as before the optimizer interface


def main_kd(args, tokens, labels):
    """Interleaved rounds of: student step, staged-KD step (fused), unfused KD step, teacher forward alone."""
    cfg, moe_cfg, model, fwd, opt, _ = build(args, "fused")
    teacher = build_teacher(args)
    temp = args.kd_temp
    runs = {
        "student step (no KD)": lambda: step(fwd, opt, tokens, labels, moe_cfg, False),
        "teacher forward": lambda: teacher.forward(tokens),
        "KD step (fused, this branch)": lambda: kd_step(fwd, opt, tokens, labels, moe_cfg, teacher, temp, True),
        "KD step (unfused, before)": lambda: kd_step(fwd, opt, tokens, labels, moe_cfg, teacher, temp, False),
    }
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in runs}
    round_med = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, fn in runs.items():
            start = len(times[k])
            for _ in range(args.steps):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
            round_med[k].append(statistics.median(times[k][start:]))
    ntok = args.micro_batch_size * args.seq_length
    print(f"config: student layers {cfg.num_layers} hidden {cfg.hidden_size} experts {args.num_experts} | teacher "
          f"layers {args.teacher_num_layers or cfg.num_layers} experts {args.teacher_num_experts or args.num_experts} "
          f"| seq {cfg.seq_length} micro-batch {args.micro_batch_size} vocab {cfg.padded_vocab_size} T {temp} | "
          f"threads {torch.get_num_threads()} | {args.rounds} rounds x {args.steps} steps, medians")
    print("| run | median ms | best ms | tokens/s (median) |")
    print("|---|---|---|---|")
    for k in runs:
        med = statistics.median(times[k])
        print(f"| {k} | {1000 * med:.0f} | {1000 * min(times[k]):.0f} | {ntok / med:.0f} |")
    s, t = round_med["student step (no KD)"], round_med["teacher forward"]
    fused, unfused = round_med["KD step (fused, this branch)"], round_med["KD step (unfused, before)"]
    ratio = statistics.median(f / (a + b) for f, a, b in zip(fused, s, t))
    print(f"KD step / (student step + teacher forward): {ratio:.3f} (median of per-round ratios; target <= 1.15)")
    print(f"KD step / student step: {statistics.median(f / a for f, a in zip(fused, s)):.2f}x; "
          f"unfused KD step / student step: {statistics.median(u / a for u, a in zip(unfused, s)):.2f}x; "
          f"unfused / fused KD step: {statistics.median(u / f for u, f in zip(unfused, fused)):.2f}x")


def main():
    args = parse()
    if args.child is not None:
        return child(json.loads(args.child))
    if args.recompute or args.zero_stage:
        return compare_memory(args)
    args.micro_batch_size = args.micro_batch_size or 4
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kd:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=g)
        labels = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=g)
        return main_kd(args, tokens, labels)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=g)
    labels = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=g)
    built = {v: build(args, v) for v in variants}
    for v in variants:  # warm up (and compile)
        _, moe_cfg, _, fwd, opt, plain = built[v]
        for _ in range(args.warmup):
            step(fwd, opt, tokens, labels, moe_cfg, plain)
    times = {v: [] for v in variants}
    round_med = {v: [] for v in variants}  # per-round medians, for per-round ratios
    peaks = []
    for _ in range(args.rounds):
        peaks.append(measure_gemm_peak(2048, repeats=3))
        for v in variants:
            start = len(times[v])
            _, moe_cfg, _, fwd, opt, plain = built[v]
            for _ in range(args.steps):
                t = time.perf_counter()
                step(fwd, opt, tokens, labels, moe_cfg, plain)
                times[v].append(time.perf_counter() - t)
            round_med[v].append(statistics.median(times[v][start:]))
    peak = max(peaks)
    cfg, moe_cfg = built[variants[0]][0], built[variants[0]][1]
    ntok = args.micro_batch_size * args.seq_length
    fpt = flops_per_token(cfg, moe_cfg)
    print(f"config: layers {cfg.num_layers} hidden {cfg.hidden_size} heads {cfg.num_attention_heads} ffn "
          f"{cfg.ffn_hidden_size} seq {cfg.seq_length} micro-batch {args.micro_batch_size} vocab "
          f"{cfg.padded_vocab_size} experts {args.num_experts} | threads {torch.get_num_threads()} | "
          f"{fpt * ntok / 1e9:.1f} GFLOP per step")
    print(f"fp32 GEMM peak (2048^3, best of {len(peaks)} rounds): {peak / 1e9:.1f} GFLOP/s")
    print("| variant | median ms/step | best ms/step | tokens/s (median) | GFLOP/s (median) | MFU (median) | "
          "MFU (best) | speed vs first (median of per-round ratios) |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        med, best = statistics.median(times[v]), min(times[v])
        ratio = statistics.median(b / m for b, m in zip(round_med[variants[0]], round_med[v]))
        print(f"| {v} | {1000 * med:.0f} | {1000 * best:.0f} | {ntok / med:.0f} | {fpt * ntok / med / 1e9:.1f} | "
              f"{100 * fpt * ntok / med / peak:.1f}% | {100 * fpt * ntok / best / peak:.1f}% | {ratio:.2f}x |")


# ------------------------------------------------------------------------------------ --recompute / --zero-stage
def _rss_peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _saved_activation_bytes(st, tokens) -> tuple:
    """(total, transformer layers): bytes kept for the backward by one forward (saved-tensor hooks; parameters
    excluded), in all and inside the transformer layers (what recomputation acts on; the rest is mostly the LM
    head's [tokens, vocab] fp32 gradient buffer, megatron/model/fused_lm_loss.py). A checkpoint keeps its inputs
    and hides what runs inside from these hooks, so its tensor inputs are added by wrapping it."""
    import megatron.model.attention as attention
    import megatron.model.gpt_model as gpt_model
    import megatron.model.transformer as transformer

    params = {p.data_ptr() for p in st.model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    original = transformer.checkpoint

    def counting_checkpoint(fn, tracker, *args):
        total[0] += sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))
        return original(fn, tracker, *args)

    layers = [0]
    run_layers = gpt_model.run_layers

    def counting_run_layers(*a, **k):
        start = total[0]
        out = run_layers(*a, **k)
        layers[0] += total[0] - start
        return out

    transformer.checkpoint = attention.checkpoint = counting_checkpoint
    gpt_model.run_layers = counting_run_layers
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = st.model(tokens, tokens)
            (out.loss.mean() + sum((s.aux_loss for s in out.moe_stats), torch.zeros(()))).backward()
    finally:
        transformer.checkpoint = attention.checkpoint = original
        gpt_model.run_layers = run_layers
        st.optimizer.zero_grad(set_to_none=True)
    return total[0], layers[0]


def child(spec: dict) -> None:
    """One variant: build the training state from flags, run warmup + timed train steps, print one JSON line."""
    from megatron import parallel_state
    from megatron.arguments import parse_args, train_config_from_args, validate
    from megatron.training import setup_train_state, train_step

    torch.set_num_threads(spec["threads"])
    _, world, device = parallel_state.init_distributed("gloo")
    args = parse_args(spec["argv"])
    cfg = train_config_from_args(args, 50304, world)
    validate(cfg, world)
    groups = parallel_state.initialize(1, cfg.moe.ep_size if cfg.moe else (1,))
    st = setup_train_state(cfg, groups, device)
    g = torch.Generator().manual_seed(groups.rank)
    mbs, seq = cfg.data.micro_batch_size, cfg.data.seq_length

    def batches():
        while True:
            yield {"text": torch.randint(0, 50257, (mbs, seq + 1), generator=g)}
    it = batches()
    out = {}
    if spec.get("activations"):
        out["saved_bytes"], out["layer_saved_bytes"] = _saved_activation_bytes(st, next(it)["text"][:, :-1])
    for _ in range(spec["warmup"]):
        train_step(st, it)
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        train_step(st, it)
        times.append(time.perf_counter() - t)
    out.update(step_s=statistics.median(times), rss_peak_mib=_rss_peak_mib(),
               optimizer_state_bytes=sum(v.numel() * v.element_size() for s_ in st.optimizer.state.values()
                                         for v in s_.values() if torch.is_tensor(v)))
    if groups.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(spec: dict, world: int) -> dict:
    """Runs `spec` in `world` fresh processes (gloo over localhost); returns rank 0's JSON result."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (o, e) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"benchmark child failed ({p.returncode}):\n{e[-3000:]}")
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _base_argv(config: str, world: int, micro_batch_size=None) -> list:
    argv = list(CONFIGS[config])
    i = argv.index("--micro-batch-size") + 1
    if micro_batch_size:
        argv[i] = str(micro_batch_size)
    return argv + ["--global-batch-size", str(int(argv[i]) * world), "--train-iters", "1000", "--lr", "1e-4"]


def _interleaved(variants: dict, world: int, threads: int, args, activations: bool) -> dict:
    """{variant: {"step_s": median over rounds, "runs": [results]}}, variants alternating within each round."""
    runs = {v: [] for v in variants}
    for r in range(args.rounds):
        for v, argv in variants.items():
            spec = {"argv": argv, "threads": threads, "warmup": args.warmup, "steps": args.steps,
                    "activations": activations and r == 0}
            runs[v].append(run_child(spec, world))
    first = next(iter(variants))
    out = {}
    for v in variants:
        out[v] = {"runs": runs[v], "step_s": statistics.median(x["step_s"] for x in runs[v]),
                  "ratio": statistics.median(x["step_s"] / y["step_s"] for x, y in zip(runs[v], runs[first])),
                  "rss": max(x["rss_peak_mib"] for x in runs[v])}
    return out


def compare_memory(args) -> None:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    threads = args.threads or torch.get_num_threads()
    mbs = args.micro_batch_size
    print("configs: " + "; ".join(f"{c}: {' '.join(_base_argv(c, 1, mbs))}" for c in configs))
    print(f"threads {threads} | rounds {args.rounds} x ({args.warmup} warmup + {args.steps} timed steps) | "
          f"step = megatron.training.train_step | ratio = median over rounds of (variant / first variant)")
    if args.recompute:
        print("\n| config | recompute | layer activations MiB | vs none | all saved MiB (+ LM head) | vs none | "
              "peak RSS MiB | median s/step | time vs none |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c in configs:
            res = _interleaved({v: _base_argv(c, 1, mbs) + f for v, f in RECOMPUTE.items()}, 1, threads, args, True)
            base, base_layers = res["none"]["runs"][0]["saved_bytes"], res["none"]["runs"][0]["layer_saved_bytes"]
            for v, r in res.items():
                saved, layer = r["runs"][0]["saved_bytes"], r["runs"][0]["layer_saved_bytes"]
                print(f"| {c} | {v} | {layer / 2**20:.1f} | {100 * (layer / base_layers - 1):+.0f}% | "
                      f"{saved / 2**20:.1f} | {100 * (saved / base - 1):+.0f}% | {r['rss']:.0f} | {r['step_s']:.3f} | "
                      f"{r['ratio']:.2f}x |")
    if args.zero_stage:
        print(f"\n| config (DP=2, 1 thread/rank) | ZeRO | optimizer state MiB/rank | vs stage 0 | peak RSS MiB "
              f"(rank 0) | median s/step | time vs stage 0 |")
        print("|---|---|---|---|---|---|---|")
        for c in configs:
            zero = ["--zero-stage", str(args.zero_stage)]
            variants = {"0": _base_argv(c, 2, mbs), str(args.zero_stage): _base_argv(c, 2, mbs) + zero}
            res = _interleaved(variants, 2, 1, args, False)
            base = res["0"]["runs"][0]["optimizer_state_bytes"]
            for v, r in res.items():
                b = r["runs"][0]["optimizer_state_bytes"]
                print(f"| {c} | {v} | {b / 2**20:.1f} | {100 * (b / base - 1):+.0f}% | {r['rss']:.0f} | "
                      f"{r['step_s']:.3f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
