"""Benchmark of one MoE layer's forward+backward against an ideal dense GEMM chain (and baselines).

Every implementation runs once per round, interleaved, and is reported as the median over rounds of
its time divided by the same round's "ideal": a dense GELU MLP over T*k rows (same FLOPs as the
experts with no routing, no dropping and no padding). Rows:
  (E=8,  T=4096, H=512, F=2048, k=1 and 2, cf 1.0 and 1.25)
  (E=64 and E=128, T=8192, H=512, F=1024, k=1, cf 1.0 and 1.25)
Implementations: ideal, moe (this package, DeepSpeed's routing semantics: MoEConfig defaults), moe_loop (the
same with the grouped GEMM seam off: a loop of per-expert GEMMs; differs from moe only where torch._grouped_mm runs,
i.e. on CUDA), hf_loop (HF-Mixtral-style loop over experts, dropless, so it ignores cf), deepspeed
(deepspeed.moe.layer.MoE with an MLP expert, only when importable). Then expert parallel: EP=2 on two processes
(1 thread each) vs one process (2 threads), same global tokens, in global tokens/s (CPU only).

--modern (issue 25) runs the Megatron-LM core style layers instead: megatron-core router family (softmax, top-k
logits then softmax over the k, dropless), SwiGLU experts without biases, against transformers' own sparse MoE block
on the same weights (outputs and input gradients asserted equal in the warm-up round, before any timing):
  fine-grained: E=64, top-8, H=512, moe-ffn = H/2, one shared expert of the same width, T=8192 (Qwen3MoeSparseMoeBlock
                plus a Qwen3MoeMLP shared expert beside it, as megatron-core's ungated shared expert)
  mixtral:      E=8, top-2, H=512, F=1792 (Mixtral's 3.5 H), T=4096 (MixtralSparseMoeBlock)
Implementations: ideal (dense SwiGLU over T*k rows at the expert width, plus the shared expert's dense SwiGLU over T
rows: the same FLOPs, no routing), moe (MoELayer), hf (the block with experts_implementation='grouped_mm', what
transformers 5 picks by default for a model built by from_pretrained/from_config), hf_eager (the block's own
per-expert loop, what a standalone block runs; slow: opt in with --impls).

    python tools/bench_moe_layer.py [--rounds 7] [--quick] [--skip-ep] [--only-ep]
    python tools/bench_moe_layer.py --modern [--rounds 3] [--impls moe,hf,hf_eager] [--cases 0]
    python tools/bench_moe_layer.py --device cuda --dtype bf16 --impls moe,moe_loop,deepspeed --skip-ep  # GPU
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import moe.experts
from moe import MoEConfig, MoELayer

CASES = [  # (E, T, H, F, k, cf)
    (8, 4096, 512, 2048, 1, 1.0), (8, 4096, 512, 2048, 1, 1.25),
    (8, 4096, 512, 2048, 2, 1.0), (8, 4096, 512, 2048, 2, 1.25),
    (64, 8192, 512, 1024, 1, 1.0), (64, 8192, 512, 1024, 1, 1.25),
    (128, 8192, 512, 1024, 1, 1.0), (128, 8192, 512, 1024, 1, 1.25),
]


class DenseMLP(nn.Module):
    def __init__(self, H, F_):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, F_), nn.Linear(F_, H)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # the experts' activation


class Ideal(nn.Module):
    """The dense GEMM chain over T*k rows: the FLOPs of the experts with perfect routing."""

    def __init__(self, H, F_):
        super().__init__()
        self.mlp = DenseMLP(H, F_)

    def forward(self, x_PD):  # x_PD: [T*k, H], made outside the timed step
        return self.mlp(x_PD), None


class HFLoop(nn.Module):
    """HF-Mixtral-style sparse block: router, top-k, then a Python loop of autograd ops over experts."""

    def __init__(self, H, F_, E, k):
        super().__init__()
        self.gate, self.k, self.E = nn.Linear(H, E, bias=False), k, E
        self.experts = nn.ModuleList(DenseMLP(H, F_) for _ in range(E))

    def forward(self, x_TD):
        probs = torch.softmax(self.gate(x_TD).float(), dim=-1)
        w_TK, sel_TK = torch.topk(probs, self.k, dim=-1)
        if self.k > 1:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        w_TK = w_TK.to(x_TD.dtype)
        out = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(sel_TK, self.E).permute(2, 1, 0)
        for e in range(self.E):
            idx, top_x = torch.where(mask_EKT[e])
            if top_x.numel():
                out.index_add_(0, top_x, self.experts[e](x_TD[top_x]) * w_TK[top_x, idx, None])
        return out, None


class OurMoE(nn.Module):
    """MoELayer with MoEConfig's defaults: DeepSpeed's routing (RTS, 2nd-expert sampling, drop order)."""

    def __init__(self, H, F_, E, k, cf, ep_group=None, grouped_mm="auto"):
        super().__init__()
        ep_size = 1 if ep_group is None else ep_group.size()
        cfg = MoEConfig(num_experts=E, topk=k, ep_size=ep_size, train_capacity_factor=cf,
                        eval_capacity_factor=cf)
        self.layer = MoELayer(H, F_, E, cfg, ep_group=ep_group)
        self.grouped_mm = grouped_mm

    def forward(self, x_TD):
        saved, moe.experts.GROUPED_MM = moe.experts.GROUPED_MM, self.grouped_mm  # read in forward only
        try:
            y, stats = self.layer(x_TD)
        finally:
            moe.experts.GROUPED_MM = saved
        return y, stats.aux_loss


def deepspeed_factory():
    """deepspeed.moe.layer.MoE when importable. Its expert groups need DeepSpeed's own communication layer
    (deepspeed.comm) initialised, not only torch.distributed: a 1-rank gloo group through deepspeed.init_distributed."""
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE as DSMoE
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")

    class DS(nn.Module):
        def __init__(self, H, F_, E, k, cf):
            super().__init__()
            self.moe = DSMoE(H, expert=DenseMLP(H, F_), num_experts=E, ep_size=1, k=k, capacity_factor=cf,
                             eval_capacity_factor=cf, min_capacity=4, drop_tokens=True, use_rts=True)
            if hasattr(self.moe, "set_deepspeed_parallelism"):  # normally done by deepspeed.initialize
                self.moe.set_deepspeed_parallelism()

        def forward(self, x_TD):
            y, l_aux, _ = self.moe(x_TD)
            return y, l_aux
    return DS


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fwd_bwd(model, x, dy):
    """One training step's layer work: forward, backward, grads reset like optimizer.zero_grad()."""
    for p in model.parameters():
        p.grad = None
    x.grad = None
    y, aux = model(x)
    loss = (y * dy).sum()
    if aux is not None:
        loss = loss + 0.01 * aux
    loss.backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return y.detach()


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(E, T, H, F_, k, cf, rounds, ds_cls, names, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    impls = {"ideal": Ideal(H, F_)}
    if "moe" in names:
        impls["moe"] = OurMoE(H, F_, E, k, cf)
    if "moe_loop" in names:
        impls["moe_loop"] = OurMoE(H, F_, E, k, cf, grouped_mm="off")
    if "hf_loop" in names:
        impls["hf_loop"] = HFLoop(H, F_, E, k)
    if "deepspeed" in names:
        impls["deepspeed"] = ds_cls(H, F_, E, k, cf)
    for m in impls.values():
        m.to(device=device, dtype=dtype)
    dd = dict(device=device, dtype=dtype)
    x = {"ideal": torch.randn(T * k, H, requires_grad=True, **dd)}
    dy = {"ideal": torch.randn(T * k, H, **dd)}
    x_T, dy_T = torch.randn(T, H, requires_grad=True, **dd), torch.randn(T, H, **dd)
    ratios = {name: [] for name in impls}
    ms = {name: [] for name in impls}
    for r in range(rounds + 1):  # round 0 warms up
        times = {name: timed(lambda m=m, name=name: fwd_bwd(m, x.get(name, x_T), dy.get(name, dy_T)))
                 for name, m in impls.items()}
        if r == 0:
            continue
        for name, t in times.items():
            ratios[name].append(t / times["ideal"])
            ms[name].append(t * 1e3)
    return {name: (statistics.median(ratios[name]), statistics.median(ms[name])) for name in impls}


# ---- modern layers (issue 25): megatron-core routers, SwiGLU experts, shared expert; vs transformers ------------

MODERN_CASES = [  # (name, E, T, H, F, k, shared F or None, transformers block)
    ("fine-grained", 64, 8192, 512, 256, 8, 256, "qwen3_moe"),
    ("mixtral", 8, 4096, 512, 1792, 2, None, "mixtral"),
]


class DenseSwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) -> W_down, gate and up fused in one [2F, D] weight (as the experts), no biases."""

    def __init__(self, H, F_):
        super().__init__()
        self.w1, self.w2 = nn.Linear(H, 2 * F_, bias=False), nn.Linear(F_, H, bias=False)

    def forward(self, x):
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class IdealSwiGLU(nn.Module):
    """The FLOPs of the routed experts (T*k rows) and the shared expert (T rows) as dense GEMM chains, no routing."""

    def __init__(self, H, F_, shared_F):
        super().__init__()
        self.routed = DenseSwiGLU(H, F_)
        self.shared = DenseSwiGLU(H, shared_F) if shared_F else None

    def forward(self, x):  # x: (rows [T*k, H], tokens [T, H]), made outside the timed step
        rows, tokens = x
        return self.routed(rows), (None if self.shared is None else self.shared(tokens))


def _hf_block(kind, E, H, F_, k, shared_F, impl):
    """transformers' own sparse MoE block (and, for the fine-grained case, a Qwen3MoeMLP shared expert beside it)."""
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F_, num_experts=E, num_experts_per_tok=k,
                             norm_topk_prob=True, hidden_act="silu")
        block, shared = Qwen3MoeSparseMoeBlock(cfg), (Qwen3MoeMLP(cfg, shared_F) if shared_F else None)
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=H, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=k,
                            hidden_act="silu")
        block, shared = MixtralSparseMoeBlock(cfg), None
    cfg._experts_implementation = impl  # read by the experts' forward at each call
    return block, shared


class HFBlock(nn.Module):
    def __init__(self, kind, E, H, F_, k, shared_F, impl):
        super().__init__()
        self.block, self.shared = _hf_block(kind, E, H, F_, k, shared_F, impl)

    def forward(self, x_TD):
        y = self.block(x_TD.unsqueeze(0)).squeeze(0)
        if self.shared is not None:
            y = y + self.shared(x_TD)
        return y, None


class ModernMoE(nn.Module):
    """MoELayer with the megatron-core router family (softmax over the top-k logits, dropless), SwiGLU, no biases."""

    def __init__(self, E, H, F_, k, shared_F):
        super().__init__()
        cfg = MoEConfig(num_experts=E, topk=k, router_family="megatron", load_balancing_type="none",
                        shared_expert_ffn_hidden_size=shared_F)
        self.layer = MoELayer(H, F_, E, cfg, activation="swiglu", bias=False)

    def forward(self, x_TD):
        y, _ = self.layer(x_TD)
        return y, None

    @torch.no_grad()
    def copy_from(self, hf: HFBlock):
        """transformers' gate_up_proj [E, 2F, D] is [gate; up] per expert, our w1_eFD's layout; down_proj = w2_eDF."""
        self.layer.router.weight.copy_(hf.block.gate.weight)
        self.layer.experts.w1_eFD.copy_(hf.block.experts.gate_up_proj)
        self.layer.experts.w2_eDF.copy_(hf.block.experts.down_proj)
        if hf.shared is not None:
            mlp = self.layer.shared_expert.mlp
            mlp.dense_h_to_4h.weight.copy_(torch.cat((hf.shared.gate_proj.weight, hf.shared.up_proj.weight)))
            mlp.dense_4h_to_h.weight.copy_(hf.shared.down_proj.weight)


def bench_modern(case, rounds, names):
    """Per-round times of each implementation, interleaved; the first round warms up and checks the outputs and the
    input gradients of moe against every transformers block (fp32, different summation orders: rtol 1e-4, atol
    1e-5 on O(1) values). Returns {name: (median time/ideal, median ms)} and {hf name: median hf/moe speed-up}."""
    _, E, T, H, F_, k, shared_F, kind = case
    torch.manual_seed(0)
    impls = {"ideal": IdealSwiGLU(H, F_, shared_F)}
    hf = {n: HFBlock(kind, E, H, F_, k, shared_F, {"hf": "grouped_mm", "hf_eager": "eager"}[n])
          for n in names if n.startswith("hf")}
    ref = next(iter(hf.values()), None)
    with torch.no_grad():
        src = ref if ref is not None else HFBlock(kind, E, H, F_, k, shared_F, "eager")
        for p in src.parameters():  # transformers leaves the expert weights uninitialised
            p.normal_(0.0, p.shape[-1] ** -0.5)
        for other in hf.values():
            for p, q in zip(other.parameters(), src.parameters()):
                p.copy_(q)
    if "moe" in names:
        impls["moe"] = ModernMoE(E, H, F_, k, shared_F)
        impls["moe"].copy_from(src)
    impls.update(hf)
    x_T, dy_T = torch.randn(T, H, requires_grad=True), torch.randn(T, H)
    x_ideal = (torch.randn(T * k, H, requires_grad=True), torch.randn(T, H, requires_grad=True))
    dy_ideal = (torch.randn(T * k, H), dy_T)
    ms = {name: [] for name in impls}
    for r in range(rounds + 1):  # round 0 warms up and checks
        times, outs = {}, {}
        for name, m in impls.items():
            if name == "ideal":
                for t in x_ideal:
                    t.grad = None
                times[name] = timed(lambda m=m: fwd_bwd_ideal(m, x_ideal, dy_ideal))
                continue
            times[name] = timed(lambda m=m: outs.__setitem__(name, fwd_bwd(m, x_T, dy_T)))
            outs[name] = (outs[name], x_T.grad.clone())
        if r == 0:
            if "moe" in outs:
                for name in hf:
                    for got, want in zip(outs["moe"], outs[name]):
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            continue
        for name, t in times.items():
            ms[name].append(t * 1e3)
    res = {name: (statistics.median(a / b for a, b in zip(ms[name], ms["ideal"])), statistics.median(ms[name]))
           for name in impls}
    speedup = {name: statistics.median(a / b for a, b in zip(ms[name], ms["moe"])) for name in hf if "moe" in ms}
    return res, speedup


def fwd_bwd_ideal(model, x, dy):
    """x, dy: (rows [T*k, H], tokens [T, H]) each."""
    for p in model.parameters():
        p.grad = None
    routed, shared = model(x)
    loss = (routed * dy[0]).sum()
    if shared is not None:
        loss = loss + (shared * dy[1]).sum()
    loss.backward()


def main_modern(args):
    names = [n for n in args.impls.split(",") if n in ("moe", "hf", "hf_eager")]
    cases = MODERN_CASES if not args.cases else [MODERN_CASES[int(i)] for i in args.cases.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine skews the ratios)")
    print(f"fp32 on cpu, {args.threads} threads, forward+backward, median over {args.rounds} rounds of time/ideal "
          f"(ideal ms = its median step time); hf/moe = median of per-round time ratios (> 1: moe faster); "
          f"outputs and input gradients of moe == transformers' checked before timing")
    print(f"{'case':>12} {'E':>3} {'T':>5} {'H':>4} {'F':>5} {'k':>2} {'shared':>6} {'ideal ms':>9} "
          + " ".join(f"{n:>9}" for n in names) + "".join(f" {n + '/moe':>12}" for n in names if n != "moe"))
    for case in cases:
        res, speedup = bench_modern(case, args.rounds, names)
        name, E, T, H, F_, k, shared_F, _ = case
        print(f"{name:>12} {E:>3} {T:>5} {H:>4} {F_:>5} {k:>2} {shared_F or '-':>6} {res['ideal'][1]:>9.1f} "
              + " ".join(f"{res[n][0]:>8.2f}x" for n in names)
              + "".join(f" {speedup[n]:>11.2f}x" for n in names if n != "moe"), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


# ---- expert parallel: EP=2 on two processes vs one process ------------------------------------------

def _ep_worker(rank, world_size, port, E, T_global, H, F_, k, cf, rounds, out_q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    group = dist.group.WORLD
    ep_model = OurMoE(H, F_, E, k, cf, ep_group=group)
    T_local = T_global // world_size
    x = torch.randn(T_local, H, requires_grad=True)
    dy = torch.randn(T_local, H)
    single = OurMoE(H, F_, E, k, cf) if rank == 0 else None
    xs, dys = torch.randn(T_global, H, requires_grad=True), torch.randn(T_global, H)
    ratios, t1s, t2s = [], [], []
    for r in range(rounds + 1):
        dist.barrier()
        t_single = 0.0
        if rank == 0:  # rank 1 waits in the barrier below, so rank 0 has both cores
            torch.set_num_threads(world_size)
            t_single = timed(lambda: fwd_bwd(single, xs, dys))
            torch.set_num_threads(1)
        dist.barrier()
        t_ep = torch.tensor([timed(lambda: fwd_bwd(ep_model, x, dy))])
        dist.all_reduce(t_ep, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
        if r and rank == 0:
            ratios.append(t_single / float(t_ep))
            t1s.append(t_single)
            t2s.append(float(t_ep))
    if rank == 0:
        out_q.put((statistics.median(ratios), statistics.median(t1s), statistics.median(t2s)))
    dist.barrier()
    dist.destroy_process_group()


def _ep_entry(rank, *args):
    torch.set_num_threads(1)
    _ep_worker(rank, 2, *args)


def bench_ep(E, T_global, H, F_, k, cf, rounds):
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_ep_entry, args=(_free_port(), E, T_global, H, F_, k, cf, rounds, q), nprocs=2, join=True)
    return q.get()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one row per expert count, 3 rounds")
    ap.add_argument("--cases", type=str, default=None, help="comma-separated row indices to run")
    ap.add_argument("--impls", type=str, default="moe,hf_loop,deepspeed",
                    help="comma-separated implementations besides the ideal (moe, moe_loop, hf_loop, deepspeed)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--skip-ep", action="store_true")
    ap.add_argument("--only-ep", action="store_true")
    ap.add_argument("--modern", action="store_true", help="the issue-25 rows (megatron-core routers, SwiGLU, shared "
                    "expert) against transformers' blocks; --impls from moe,hf,hf_eager (default moe,hf)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.modern:
        if args.impls == ap.get_default("impls"):
            args.impls = "moe,hf"
        if args.rounds == ap.get_default("rounds"):
            args.rounds = 3
        return main_modern(args)
    cases = CASES
    if args.quick:
        cases, args.rounds = [CASES[0], CASES[4], CASES[6]], 3
    if args.cases:
        cases = [CASES[int(i)] for i in args.cases.split(",")]
    if not args.only_ep:
        ds_cls = deepspeed_factory()
        names = [n for n in args.impls.split(",") if n != "deepspeed" or ds_cls is not None]
        print(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine skews the ratios)")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        print(f"{args.dtype} on {args.device}, {args.threads} threads, forward+backward, median over {args.rounds} rounds of time/ideal "
              f"(ideal ms = its median step time){'' if ds_cls else '; deepspeed not installed'}")
        print(f"{'E':>4} {'T':>5} {'H':>4} {'F':>5} {'k':>2} {'cf':>5} {'ideal ms':>9} "
              + " ".join(f"{n:>10}" for n in names))
        for E, T, H, F_, k, cf in cases:
            res = bench_case(E, T, H, F_, k, cf, args.rounds, ds_cls, names, args.device, dtype)
            print(f"{E:>4} {T:>5} {H:>4} {F_:>5} {k:>2} {cf:>5} {res['ideal'][1]:>9.1f} "
                  + " ".join(f"{res[n][0]:>9.2f}x" for n in names), flush=True)
    if not args.skip_ep and args.device == "cpu":
        E, T, H, F_, k, cf = CASES[0]
        ratio, t1, t2 = bench_ep(E, T, H, F_, k, cf, args.rounds)
        print(f"EP=2 on 2 processes (1 thread each) vs 1 process (2 threads), E={E} T_global={T} H={H} F={F_} "
              f"k={k} cf={cf}: 1-proc {T / t1:,.0f} tok/s, EP=2 {T / t2:,.0f} tok/s (medians), EP=2 / 1-proc throughput "
              f"{ratio:.3f} (median of per-round ratios)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
