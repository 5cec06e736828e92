"""EP=2 on gloo under bf16 autocast with fp32 (LayerNorm) input: the token all-to-all carries bf16, every expert
GEMM is bf16, and forward + backward of a MoE layer costs one host sync (the split sizes: dispatch.counts_to_host)."""
import torch
import torch.distributed as dist

from tests.dist.launcher import run_distributed

D, FF, E = 16, 32, 4


def _worker(rank, world_size):
    return {drop_tokens: _audit(rank, world_size, drop_tokens) for drop_tokens in (True, False)}


def audit_bf16_step(layer, x):
    """One forward + backward of `layer` on x under bf16 autocast with CUDA's fp32-LayerNorm rule, after a warm-up:
    the audited host syncs, the dtypes every all-to-all carried and the expert GEMMs' dtypes."""
    from megatron.audit import DispatchAudit, cuda_autocast_rules
    from moe import dispatch

    sent = []
    original = dispatch._AllToAll.forward

    def recording(ctx, t, *args):
        sent.append(t.dtype)
        return original(ctx, t, *args)

    dispatch._AllToAll.forward = staticmethod(recording)  # (this spawned process only)

    def step():
        with cuda_autocast_rules(torch.bfloat16):
            y, stats = layer(torch.nn.functional.layer_norm(x, x.shape[-1:]))
        (y.float().square().mean() + stats.aux_loss).backward()

    step()  # warm-up
    sent.clear()
    with DispatchAudit() as audit:
        step()
    dispatch._AllToAll.forward = staticmethod(original)
    expert = {g.dtypes[0] for g in audit.gemms if g.site.startswith(("moe/experts.py", "moe/ops/"))}
    return {"syncs": [f"{s.op} @ {s.site}" for s in audit.syncs], "sent": sent, "expert": expert}


def _audit(rank, world_size, drop_tokens):
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, MoEConfig(num_experts=E, topk=2, ep_size=world_size, drop_tokens=drop_tokens),
                     ep_group=dist.group.WORLD)
    x = torch.randn(24 + 8 * rank, D)
    return audit_bf16_step(layer, x)


def test_ep2_bf16_all_to_all_and_one_sync():
    """Capacity and dropless mode in one launch (each launch costs seconds)."""
    for by_mode in run_distributed(_worker, 2):
        for r in by_mode.values():
            assert r["sent"] == [torch.bfloat16, torch.bfloat16], r  # dispatch and combine, both in the compute dtype
            assert r["expert"] == {torch.bfloat16}, r
            assert len(r["syncs"]) == 1 and "counts_to_host" in r["syncs"][0], r["syncs"]
