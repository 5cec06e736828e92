"""--sequence-parallel at TP=2 equals SP off at TP=2 (issue 27), on two gloo processes, one spawn for every case.

Both models are built from the same seed on the same rank (weights initialised whole and cut, so identical), run
the same batch, and compare: the per-token loss, the MoE aux and z losses, and every parameter's gradient after
the SP model's sequence-parallel gradients are summed over TP (allreduce_sequence_parallel_grads). Cases: a
GPT-2-style block (LayerNorm, MHA, biases, learned positions, tied head; the logits path too), a Llama/Qwen-style
block (RMSNorm, GQA, QK-norm, SwiGLU, RoPE, untied head, no biases), MLA (with and without the query
latent; the replicated down projections then hold partial gradients, summed over TP), and MoE layers with the megatron-core router
(softmax top-2, aux loss, z-loss; seq_aux_loss; sigmoid with expert bias) and with the DeepSpeed router (top-2
gshard aux loss), all dropless (with dropping, capacity is per rank's tokens under SP, as in Megatron-LM).
Tolerance rtol 1e-5 / atol 1e-6 (fp32): SP sums the same partial products in another order (reduce-scatter vs
all-reduce, per-chunk token sums of the router statistics)."""
import dataclasses

import pytest
import torch

from megatron import parallel_state
from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.tensor_parallel import allreduce_sequence_parallel_grads
from moe import gating
from moe.config import MoEConfig
from tests.dist.launcher import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)
COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, padded_vocab_size=96,
              max_position_embeddings=16, seq_length=16, hidden_dropout=0.0, attention_dropout=0.0)
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
             untie_embeddings_and_output_weights=True, num_query_groups=2, qk_layernorm=True)
MLA_SP = dict(position_embedding_type="rope", normalization="RMSNorm", multi_latent_attention=True, q_lora_rank=16,
              kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, qk_layernorm=True)
MOE = dict(topk=2, drop_tokens=False, layer_freq=(0, 1), moe_ffn_hidden_size=16, loss_coeff=0.01)


def _cases():
    return {
        "gpt2-dense": (ModelConfig(**COMMON), None, True),
        "llama-dense": (ModelConfig(**COMMON, **LLAMA), None, False),
        "mla-q-lora": (ModelConfig(**COMMON, **MLA_SP), None, True),
        "mla-no-q-lora-bias": (ModelConfig(**COMMON, **dict(MLA_SP, q_lora_rank=None, qk_layernorm=False)), None,
                               False),
        "moe-megatron-aux-z": (ModelConfig(**COMMON, **LLAMA),
                               MoEConfig(num_experts=(4,), router_family="megatron", z_loss_coeff=1e-3,
                                         shared_expert_ffn_hidden_size=16, shared_expert_gate=True, **MOE), False),
        "moe-megatron-seq-aux": (ModelConfig(**COMMON),
                                 MoEConfig(num_experts=(4,), router_family="megatron",
                                           load_balancing_type="seq_aux_loss", **MOE), False),
        "moe-megatron-sigmoid-bias": (ModelConfig(**COMMON, **LLAMA),
                                      MoEConfig(num_experts=(4,), router_family="megatron", score_function="sigmoid",
                                                expert_bias=True, **MOE), False),
        "moe-deepspeed": (ModelConfig(**COMMON), MoEConfig(num_experts=(4,), second_expert_sampling=False, **MOE),
                          False),
    }


def _run(model, moe, tp_group, logits: bool, dedup: bool = False):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    labels = torch.randint(0, 96, (2, 12), generator=g)
    out = model(tokens, labels, return_logits=logits, parallel_output=True)
    aux = sum((s.aux_loss for s in out.moe_stats), torch.zeros(()))
    z = sum((s.z_loss for s in out.moe_stats), torch.zeros(()))
    total = out.loss.mean() + (moe.loss_coeff * aux + moe.z_loss_coeff * z if moe is not None else 0.0)
    total.backward()
    allreduce_sequence_parallel_grads(model, tp_group)  # no-op without SP (no marked parameters)
    if dedup:  # SP off: TP ranks dispatched disjoint token slices (issue 27); the expert-DP reduction sums over TP
        from megatron.tensor_parallel.layers import sum_grads_over
        from moe.experts import is_expert_param
        sum_grads_over([p for p in model.parameters() if is_expert_param(p)], tp_group)
    if moe is not None and moe.expert_bias:
        gating.step_routers(model)  # the bias update from the counted (TP-summed under SP) kept pairs
    res = {"loss": out.loss.detach(), "aux": aux.detach(), "z": z.detach(),
           "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
           "buffers": {n: b.clone() for n, b in model.named_buffers() if "expert_bias" in n}}
    if logits:
        res["logits"] = out.logits.detach()
    return res


def _sp_vs_off(rank, world_size):
    groups = parallel_state.initialize(2, (1,))
    sp_groups = dataclasses.replace(groups, sequence_parallel=True)
    out = {}
    for name, (cfg, moe, logits) in _cases().items():
        runs = []
        for gr in (groups, sp_groups):
            torch.manual_seed(11)
            runs.append(_run(GPTModel(cfg, moe, gr), moe, groups.tp_group, logits, gr.token_dedup_group is not None))
        out[name] = runs
    return out


_RESULTS = []


def _results():
    if not _RESULTS:
        _RESULTS.append(run_distributed(_sp_vs_off, 2))
    return _RESULTS[0]


@pytest.mark.parametrize("case", list(_cases()))
def test_sequence_parallel_equals_sp_off_at_tp2(case):
    for rank, per_rank in enumerate(_results()):
        off, on = per_rank[case]
        torch.testing.assert_close(on["loss"], off["loss"], **TOL)
        torch.testing.assert_close(on["aux"], off["aux"], **TOL)
        torch.testing.assert_close(on["z"], off["z"], **TOL)
        if "logits" in off:
            torch.testing.assert_close(on["logits"], off["logits"], **TOL)
        assert on["grads"].keys() == off["grads"].keys(), f"rank {rank}: other parameters got gradients"
        for n in off["grads"]:
            torch.testing.assert_close(on["grads"][n], off["grads"][n], **TOL, msg=lambda m: f"rank {rank} {n}: {m}")
        for n in off["buffers"]:
            torch.testing.assert_close(on["buffers"][n], off["buffers"][n], rtol=0, atol=0)


def _train(rank, world_size, argv):
    from megatron.training import pretrain
    r = pretrain(argv)
    return {"losses": r["losses"], "weights": {k: v.detach().clone() for k, v in r["state"].model.state_dict().items()}}


@pytest.mark.slow  # two 2-process CLI runs: ~50 s on the shared 2 cores
def test_sequence_parallel_training_equals_tp2_training(tiny_corpus, tmp_path):
    """Whole CLI runs: TP=2 + --sequence-parallel (MoE, dropless top-2, clip every step so the grad norm must be
    right) against TP=2 without it, 4 steps; losses and every weight to 1e-5 (fp32 reduction order). The router's
    random draws (DeepSpeed's Gumbel 2nd-expert sampling, RTS, jitter) are drawn per sequence chunk under SP, so
    they agree with SP off in distribution only: this run switches them off."""
    from tests.conftest import tiny_train_argv
    argv = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--hidden-dropout", "0.0",
                           "--attention-dropout", "0.0", "--clip-grad", "0.05", "--num-experts", "4",
                           "--expert-interval", "2", "--topk", "2", "--disable-moe-token-dropping",
                           "--disable-moe-top2-2nd-expert-sampling",  # Gumbel draws are per chunk under SP
                           "--tensor-model-parallel-size", "2")
    off = run_distributed(_train, 2, argv)
    on = run_distributed(_train, 2, argv + ["--sequence-parallel"])
    for a, b in zip(on, off):
        torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=1e-5)
        for k in b["weights"]:
            torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=1e-5, atol=1e-5, msg=k)
