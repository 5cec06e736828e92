"""--context-parallel-size 2 equals CP=1 (issue 27): each CP rank runs its load-balanced chunks (of 4, rank 0
keeps 0 and 3, rank 1 keeps 1 and 2) and attends over all-gathered keys/values; the gathered per-token loss, the
MoE aux/z losses and every gradient (after finalize_model_grads sums them over CP) equal the model without CP.
Cases at CP=2 against one process: GPT-2-style (LayerNorm, MHA, learned positions), Llama-style (RMSNorm, GQA,
QK-norm, SwiGLU, RoPE), MLA, MoE with the megatron-core router (aux + z loss, seq_aux_loss) and the DeepSpeed
router; and TP=2 x CP=2 with --sequence-parallel (MoE) against TP=2 alone, on four processes.
Tolerance rtol 1e-5 / atol 1e-6 (fp32): the same sums in another order (softmax over gathered keys, gradient sums
over ranks)."""
import dataclasses

import pytest
import torch

from megatron import parallel_state
from megatron.config import ModelConfig
from megatron.context_parallel import finalize_model_grads, local_indices, natural_order
from megatron.model import GPTModel
from moe.config import MoEConfig
from tests.dist.launcher import run_distributed
from tests.dist.test_sequence_parallel import COMMON, LLAMA, MOE

TOL = dict(rtol=1e-5, atol=1e-6)
MLA = dict(position_embedding_type="rope", normalization="RMSNorm", multi_latent_attention=True, q_lora_rank=16,
           kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, qk_layernorm=True)


def _cases():
    return {
        "gpt2-dense": (ModelConfig(**COMMON), None),
        "llama-dense": (ModelConfig(**COMMON, **LLAMA), None),
        "mla": (ModelConfig(**COMMON, **MLA), None),
        "moe-megatron-aux-z": (ModelConfig(**COMMON, **LLAMA),
                               MoEConfig(num_experts=(4,), router_family="megatron", z_loss_coeff=1e-3, **MOE)),
        "moe-megatron-seq-aux": (ModelConfig(**COMMON), MoEConfig(num_experts=(4,), router_family="megatron",
                                                                  load_balancing_type="seq_aux_loss", **MOE)),
        "moe-deepspeed": (ModelConfig(**COMMON), MoEConfig(num_experts=(4,), second_expert_sampling=False, **MOE)),
    }


def _run(model, moe, groups):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    labels = torch.randint(0, 96, (2, 12), generator=g)
    out = model(tokens, labels, return_logits=False)
    aux = sum((s.aux_loss for s in out.moe_stats), torch.zeros(()))
    z = sum((s.z_loss for s in out.moe_stats), torch.zeros(()))
    total = out.loss.mean() + (moe.loss_coeff * aux + moe.z_loss_coeff * z if moe is not None else 0.0)
    total.backward()
    finalize_model_grads(model, groups)
    if groups is not None and groups.token_dedup_group is not None:  # TP without SP: TP ranks dispatched disjoint
        # token slices (issue 27); the expert-DP reduction (its group spans TP) sums their expert gradients
        from megatron.tensor_parallel.layers import sum_grads_over
        from moe.experts import is_expert_param
        sum_grads_over([p for p in model.parameters() if is_expert_param(p)], groups.tp_group)
    active = model.cp_group is not None and all(layer.self_attention.cp_group is not None for layer in model.layers)
    return {"cp_active": active, "loss": out.loss.detach(), "aux": aux.detach(), "z": z.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}


def _cp2(rank, world_size):
    groups = parallel_state.initialize(1, (1,), cp_size=2)
    out = {}
    for name, (cfg, moe) in _cases().items():
        torch.manual_seed(11)
        ref = _run(GPTModel(cfg, moe, None), moe, None)
        torch.manual_seed(11)
        out[name] = (ref, _run(GPTModel(cfg, moe, groups), moe, groups))
    return out


def _tp2_cp2_sp(rank, world_size):
    groups = parallel_state.initialize(2, (1,), cp_size=2, sequence_parallel=True)
    tp_only = dataclasses.replace(groups, cp_group=None, cp_size=1, sequence_parallel=False)
    cfg = ModelConfig(**COMMON, **LLAMA)
    moe = MoEConfig(num_experts=(4,), router_family="megatron", z_loss_coeff=1e-3, **MOE)
    torch.manual_seed(11)
    ref = _run(GPTModel(cfg, moe, tp_only), moe, tp_only)
    torch.manual_seed(11)
    return {"tp2-cp2-sp-moe": (ref, _run(GPTModel(cfg, moe, groups), moe, groups))}


_RESULTS = {}


def _results(which):
    if which not in _RESULTS:
        _RESULTS[which] = run_distributed(_cp2, 2) if which == "cp2" else run_distributed(_tp2_cp2_sp, 4)
    return _RESULTS[which]


def _compare(per_rank, case):
    for rank, res in enumerate(per_rank):
        ref, cp = res[case]
        assert cp["cp_active"] and not ref["cp_active"]
        for key in ("loss", "aux", "z"):
            torch.testing.assert_close(cp[key], ref[key], **TOL, msg=lambda m: f"rank {rank} {key}: {m}")
        assert cp["grads"].keys() == ref["grads"].keys()
        for n in ref["grads"]:
            torch.testing.assert_close(cp["grads"][n], ref["grads"][n], **TOL, msg=lambda m: f"rank {rank} {n}: {m}")


@pytest.mark.parametrize("case", list(_cases()))
def test_context_parallel_equals_cp1(case):
    _compare(_results("cp2"), case)


@pytest.mark.slow  # four processes on the shared cores: ~25 s
def test_tp2_cp2_sequence_parallel_moe_equals_tp2():
    _compare(_results("tp2cp2"), "tp2-cp2-sp-moe")


def test_load_balanced_chunks():
    """2N chunks, rank i holds chunk i and 2N-1-i (Megatron-LM's causal load balancing): equal causal work."""
    assert local_indices(8, 0, 2).tolist() == [0, 1, 6, 7] and local_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    cat = torch.cat([local_indices(12, r, 3) for r in range(3)])
    assert cat[natural_order(12, 3)].tolist() == list(range(12))
    work = [int((local_indices(16, r, 4) + 1).sum()) for r in range(4)]  # keys each rank's queries attend to
    assert len(set(work)) == 1


@pytest.mark.slow  # a 2-process CLI run and a 1-process one: ~40 s on the shared cores
def test_context_parallel_training_equals_single_process(tiny_corpus, tmp_path):
    """Whole CLI runs: --context-parallel-size 2 on two ranks (DP 1) against one process, MoE top-2 dropless,
    clipped every step (the grad norm must be right), 4 steps: losses and every weight to 1e-5."""
    from megatron.training import pretrain
    from tests.conftest import tiny_train_argv
    from tests.dist.test_sequence_parallel import _train
    argv = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", "--hidden-dropout", "0.0",
                           "--attention-dropout", "0.0", "--clip-grad", "0.05", "--num-experts", "4",
                           "--expert-interval", "2", "--topk", "2", "--disable-moe-token-dropping",
                           "--disable-moe-top2-2nd-expert-sampling")
    ref = pretrain(argv)
    ranks = run_distributed(_train, 2, argv + ["--context-parallel-size", "2"])
    want = ref["state"].model.state_dict()
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
        for k in want:
            torch.testing.assert_close(r["weights"][k], want[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.slow  # three 2-process CLI runs
def test_context_parallel_cli_resume_is_exact(tiny_corpus, tmp_path):
    """CP=2 (MoE, dropout on): stop at 3 with a checkpoint (one writer per file: CP rank 0), resume to 6: the
    resumed losses and weights are bitwise those of the straight run."""
    import os

    from tests.conftest import tiny_train_argv
    from tests.dist.test_sequence_parallel import _train
    base = tiny_train_argv(tiny_corpus, tmp_path, "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                           "--context-parallel-size", "2", "--num-experts", "4", "--expert-interval", "2")
    straight = run_distributed(_train, 2, base + ["--train-iters", "6"])
    save = str(tmp_path / "ckpt")
    run_distributed(_train, 2, base + ["--train-iters", "6", "--exit-interval", "3", "--save", save,
                                       "--save-interval", "3"])
    assert "mp_rank_00" in os.listdir(os.path.join(save, "iter_0000003"))
    resumed = run_distributed(_train, 2, base + ["--train-iters", "6", "--load", save])
    for a, b in zip(straight, resumed):
        assert a["losses"][3:] == b["losses"]
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k
