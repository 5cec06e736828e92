"""TP=2 equals TP=1 for the Megatron-LM core blocks (issue 25) on two gloo processes: a GQA + SwiGLU + RMSNorm +
QK-norm model with an untied head and no biases, with a SwiGLU MoE layer and a gated shared expert, and an MLA
model. Weights are initialised whole and cut, so forward, loss and every gradient (sharded ones against the
matching slice, including the [gate_r; up_r] halves of the fused SwiGLU projection) agree to fp32 round-off
(rtol 1e-5 / atol 1e-6: the all-reduce sums partial products in another order)."""
import torch

from megatron import parallel_state
from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.tensor_parallel import is_tensor_parallel_param, merge_partitions
from moe.config import MoEConfig
from tests.dist.launcher import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)


def _cases():
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, padded_vocab_size=96,
                  max_position_embeddings=16, seq_length=16, hidden_dropout=0.0, attention_dropout=0.0,
                  position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                  add_bias_linear=False, untie_embeddings_and_output_weights=True)
    moe = MoEConfig(num_experts=(4,), topk=2, drop_tokens=False, second_expert_sampling=False, layer_freq=(0, 1),
                    moe_ffn_hidden_size=16, shared_expert_ffn_hidden_size=16, shared_expert_gate=True)
    return {
        "gqa-swiglu-rmsnorm": (ModelConfig(**common, num_query_groups=2, qk_layernorm=True, rotary_percent=0.5),
                               moe),
        "mla": (ModelConfig(**common, multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=8, qk_head_dim=8,
                            qk_pos_emb_head_dim=4, v_head_dim=8, qk_layernorm=True), None),
    }


def _run(model):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    labels = torch.randint(0, 96, (2, 12), generator=g)
    out = model(tokens, labels, return_logits=True)
    (out.loss.mean() + sum(s.aux_loss for s in out.moe_stats)).backward()
    return {"loss": out.loss.detach(), "logits": out.logits.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "meta": {n: (is_tensor_parallel_param(p), getattr(p, "partition_dim", None),
                         getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()}}


def _tp2(rank, world_size):
    """One spawn for both tests (each spawn costs seconds): the TP=2 models, then the EP=2 layer."""
    groups = parallel_state.initialize(2, (1,))
    out = {}
    for name, (cfg, moe) in _cases().items():
        torch.manual_seed(11)
        out[name] = _run(GPTModel(cfg, moe, groups))
    out["ep2"] = _ep2(rank, world_size)
    return out


_RANKS = []


def _ranks():
    if not _RANKS:
        _RANKS.extend(run_distributed(_tp2, 2))
    return _RANKS


def test_tp2_blocks_equal_tp1():
    ranks = _ranks()
    for name, (cfg, moe) in _cases().items():
        torch.manual_seed(11)
        ref = _run(GPTModel(cfg, moe))
        sharded = 0
        for r in ranks:
            torch.testing.assert_close(r[name]["loss"], ref["loss"], **TOL)
            torch.testing.assert_close(r[name]["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        for pname, want_w in ref["weights"].items():
            is_tp, dim, stride = ranks[0][name]["meta"][pname]
            if is_tp:
                sharded += 1
                for key, want in (("weights", want_w), ("grads", ref["grads"].get(pname))):
                    got = merge_partitions([r[name][key][pname] for r in ranks], dim, stride)
                    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name} {key} {pname}: {m}")
            elif ".experts." in pname:  # TP ranks dispatch disjoint token slices (issue 27): partial gradients,
                # summed over TP by the expert-DP reduction (its group spans the TP ranks)
                for r in ranks:
                    torch.testing.assert_close(r[name]["weights"][pname], want_w, rtol=0, atol=0)
                if pname in ref["grads"]:
                    torch.testing.assert_close(sum(r[name]["grads"][pname] for r in ranks), ref["grads"][pname],
                                               **TOL, msg=lambda m: f"{name} grad {pname}: {m}")
            else:
                for r in ranks:
                    torch.testing.assert_close(r[name]["weights"][pname], want_w, rtol=0, atol=0)
                    if pname in ref["grads"]:
                        torch.testing.assert_close(r[name]["grads"][pname], ref["grads"][pname], **TOL,
                                                   msg=lambda m: f"{name} grad {pname}: {m}")
        assert sharded >= 6, (name, sharded)  # embedding, head, attention and dense-MLP projections


def _ep2(rank, world_size):
    """EP=2 SwiGLU experts (w1 [e, 2F, D] cut by expert) with a gated shared expert, against the whole layer."""
    import torch.distributed as dist

    from moe.layer import MoELayer

    cfg = dict(num_experts=4, topk=2, drop_tokens=False, second_expert_sampling=False,
               shared_expert_ffn_hidden_size=8, shared_expert_gate=True)
    torch.manual_seed(0)
    ref = MoELayer(6, 10, 4, MoEConfig(**cfg), activation="swiglu", bias=False).double()
    ep = MoELayer(6, 10, 4, MoEConfig(**cfg, ep_size=2), ep_group=dist.group.WORLD, activation="swiglu",
                  bias=False).double()
    with torch.no_grad():
        for name, p in ep.named_parameters():
            want = dict(ref.named_parameters())[name]
            p.copy_(want[rank * 2:(rank + 1) * 2] if name.startswith("experts.") else want)
    xs = [torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9 + r)) for r in range(2)]
    x = xs[rank].clone().requires_grad_(True)
    y, _ = ep(x)
    (y ** 2).sum().backward()
    ref_x = xs[rank].clone().requires_grad_(True)
    ref_y, _ = ref(ref_x)
    (ref_y ** 2).sum().backward()
    return {"y": (y - ref_y).abs().max().item(), "x_grad": (x.grad - ref_x.grad).abs().max().item()}


def test_ep2_swiglu_shared_expert_equals_ep1():
    """float64: differences are summation order only (1e-12)."""
    for r in _ranks():
        assert r["ep2"]["y"] < 1e-12 and r["ep2"]["x_grad"] < 1e-12, r["ep2"]
