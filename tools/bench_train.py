"""Benchmark the full training step (forward, backward, AdamW) of a GPT config: tokens/s and MFU.

MFU is measured against the fp32 GEMM peak measured in the same run (best of several n x n matmuls),
with Megatron's FLOP accounting (megatron/flops.py). Variants run interleaved in rounds so machine noise
hits them alike; medians are reported.

    python tools/bench_train.py                      # the issue's reference config (8L, h512, s512, b4)
    python tools/bench_train.py --variants eager,compile --rounds 5
    python tools/bench_train.py --kd                 # staged-KD student step vs the plain student step and the
                                                     # teacher's forward alone (target: kd <= 1.15 x (student + teacher))
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.config import ModelConfig  # noqa: E402
from megatron.flops import flops_per_token, measure_gemm_peak  # noqa: E402
from megatron.model import GPTModel  # noqa: E402
from megatron.optimizer import build_optimizer  # noqa: E402
from megatron.config import OptimizerConfig  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--ffn-hidden-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
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
    return p.parse_args()


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
    opt.step()


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
    opt.step()


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


if __name__ == "__main__":
    main()
