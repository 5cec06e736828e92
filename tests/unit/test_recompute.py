"""Activation recomputation (Megatron-LM's --recompute-granularity full|selective) changes memory, not numbers:
with dropout on, the losses and every gradient equal those of the same model without recomputation, dense and MoE
(router noise and RTS included), over two steps (the RNG streams continue identically after a recompute)."""
import dataclasses

import pytest
import torch

from megatron.config import ModelConfig
from megatron.errors import ConfigError
from megatron.model import GPTModel
from moe.config import MoEConfig

BASE = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, padded_vocab_size=96,
                   max_position_embeddings=16, seq_length=16, hidden_dropout=0.1, attention_dropout=0.1)
RECOMPUTE = {"off": {}, "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform",
                                                recompute_num_layers=1),
             "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
             "full-block-3": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
             "selective": dict(recompute_granularity="selective")}


def _moe(kind):
    if kind == "dense":
        return None
    # RTS (random drop priority) and RSample (Gumbel noise on the logits): the recomputed router must redraw both
    return MoEConfig(num_experts=(4,), expert_interval=2, topk=2, train_capacity_factor=1.0, min_capacity=1,
                     noisy_gate_policy="RSample", use_rts=True)


def run(recompute: dict, kind: str, steps: int = 2):
    """Two forward/backward passes (no optimizer step) from seed 5; returns losses and grads per pass."""
    torch.manual_seed(5)
    model = GPTModel(dataclasses.replace(BASE, **recompute), _moe(kind))
    model.train()
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, 96, (2, 16), generator=g)
        labels = torch.randint(0, 96, (2, 16), generator=g)
        model.zero_grad(set_to_none=True)
        o = model(tokens, labels)
        loss = o.loss.mean() + 0.01 * sum((s.aux_loss for s in o.moe_stats), torch.zeros(()))
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("mode", [m for m in RECOMPUTE if m != "off"])
def test_recompute_equals_no_recompute(kind, mode):
    ref, got = run(RECOMPUTE["off"], kind), run(RECOMPUTE[mode], kind)
    for (l0, g0), (l1, g1) in zip(ref, got):
        # bit for bit: the recompute runs the same kernels on the same inputs with the same dropout masks
        assert torch.equal(l0, l1)
        assert g0.keys() == g1.keys() and len(g0) > 10
        for n in g0:
            assert torch.equal(g0[n], g1[n]), n


def test_recompute_frees_activations():
    """The point of it: fewer bytes saved for backward (counted with torch's saved-tensor hooks)."""
    def saved_bytes(recompute):
        torch.manual_seed(5)
        model = GPTModel(dataclasses.replace(BASE, **recompute), None)
        tokens = torch.randint(0, 96, (2, 16))
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, tokens).loss.mean()
        return total[0]
    off, full = saved_bytes({}), saved_bytes(RECOMPUTE["full-uniform-1"])
    assert full < 0.5 * off, (full, off)


@pytest.mark.parametrize("kwargs,match", [
    (dict(recompute_granularity="full"), "needs --recompute-method"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "needs --recompute-num-layers"),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
     r"--recompute-num-layers \(3\) must divide --num-layers \(4\)"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5),
     r"--recompute-num-layers \(5\) must be <= --num-layers \(4\)"),
    (dict(recompute_method="block"), "need --recompute-granularity full"),
])
def test_recompute_config_rules(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(BASE, **kwargs)
    dataclasses.replace(BASE, recompute_granularity="selective", recompute_method="block")  # ignored (warned)


def test_megatron_deepspeed_spellings():
    """--checkpoint-activations is Megatron-LM's full/uniform/1; --use-distributed-optimizer is ZeRO stage 1 (a
    higher --zero-stage wins)."""
    from megatron.arguments import parse_args, train_config_from_args

    base = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "10"]
    m = train_config_from_args(parse_args(base + ["--checkpoint-activations"]), 128).model
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == ("full", "uniform", 1)
    m = train_config_from_args(parse_args(base + ["--checkpoint-activations", "--recompute-method", "block",
                                                  "--recompute-num-layers", "2"]), 128).model
    assert (m.recompute_granularity, m.recompute_method, m.recompute_num_layers) == ("full", "block", 2)
    for flags, stage in ((["--use-distributed-optimizer"], 1), ([], 0),
                         (["--use-distributed-optimizer", "--zero-stage", "2"], 2)):
        assert train_config_from_args(parse_args(base + flags), 128).parallel.zero_stage == stage
