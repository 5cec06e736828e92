"""Tensor parallelism (TP=2 on two gloo processes) against the single-process model built from the same seed.

Weights are initialised whole and cut (megatron/tensor_parallel/layers.py), so the TP=2 model holds exactly the
TP=1 model's numbers: forward, every gradient (sharded ones against the matching slice) and whole training runs
must agree to fp32 round-off; a TP=2 checkpoint resumes bit-exactly, dropout (per-rank RNG stream) included.

Every multi-process run of this file happens in two spawns (the `tp_runs` module fixture: one of 2 ranks running
all 2-rank jobs in order, one of 4 ranks); each test checks its own jobs' results.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from megatron import parallel_state
from megatron.config import ModelConfig
from megatron.model import GPTModel
from megatron.tensor_parallel import is_tensor_parallel_param, merge_partitions, vocab_parallel_cross_entropy
from megatron.training import pretrain
from moe.config import MoEConfig
from tests.conftest import tiny_train_argv
from tests.dist.launcher import run_distributed_jobs


def _cfg(rope: bool) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                       padded_vocab_size=96, max_position_embeddings=16, seq_length=16, hidden_dropout=0.0,
                       attention_dropout=0.0,
                       position_embedding_type="rope" if rope else "learned_absolute")


def _moe_cfg(moe: bool):
    # no random 2nd-expert sampling: each forward would draw other Gumbel noise (DeepSpeed samples in eval too)
    return (MoEConfig(num_experts=(4,), expert_interval=2, topk=2, drop_tokens=False, second_expert_sampling=False)
            if moe else None)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _run_model(rank, world_size, rope, moe):
    groups = parallel_state.initialize(2, (1,))
    torch.manual_seed(11)
    model = GPTModel(_cfg(rope), _moe_cfg(moe), groups)
    meta = {n: (is_tensor_parallel_param(p), getattr(p, "partition_dim", None), getattr(p, "partition_stride", 1))
            for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    labels = torch.randint(0, 96, (2, 12), generator=g)
    out = model(tokens, labels, return_logits=True)  # logits + vocab-parallel cross entropy
    (out.loss.mean() + sum(s.aux_loss for s in out.moe_stats)).backward()
    grads = _grads(model)
    model.zero_grad()
    fused = model(tokens, labels)  # training path: fused LM head + loss over this rank's vocabulary slice
    assert fused.logits is None
    (fused.loss.mean() + sum(s.aux_loss for s in fused.moe_stats)).backward()
    return {"loss": out.loss.detach(), "logits": out.logits.detach(), "grads": grads, "meta": meta,
            "fused_loss": fused.loss.detach(), "fused_grads": _grads(model),
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _ce_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 10, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 10, (5, 7), generator=g)
    return logits, labels


def _train_argv(corpus, tmp, moe):
    extra = ["--num-experts", "4", "--expert-interval", "2", "--topk", "2"] if moe else []
    return tiny_train_argv(corpus, tmp, "--train-iters", "6", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
                           "--clip-grad", "0.05", *extra)


def _resume_base(corpus, tmp):
    return tiny_train_argv(corpus, tmp, "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
                           "--tensor-model-parallel-size", "2", "--num-experts", "4", "--expert-interval", "2")


def _convert_base(corpus, tmp):
    # (no RTS: DeepSpeed's top-1 RTS also draws in eval, so two inference loads below would drop differently)
    return tiny_train_argv(corpus, tmp, "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--num-experts", "4",
                           "--expert-interval", "2", "--train-iters", "6", "--no-moe-use-rts")


def _dp_ep_argv(corpus, tmp):
    # dropless and no 2nd-expert sampling: random token selection and Gumbel sampling draw from each rank's
    # generator, so DP ranks would route differently from one process running the same micro-batches in turn
    return tiny_train_argv(corpus, tmp, "--train-iters", "4", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
                           "--num-experts", "4", "--expert-interval", "2", "--topk", "2", "--clip-grad", "0.05",
                           "--disable-moe-token-dropping", "--disable-moe-top2-2nd-expert-sampling")


def _kd_argv(corpus, tmp, teacher):
    return tiny_train_argv(corpus, tmp, "--train-iters", "4", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
                           "--kd", "--load-teacher", teacher, "--num-layers-teacher", "3", "--kd-temp", "2.0",
                           "--kd-alpha-ce", "0.5", "--kd-beta-ce", "1.0", "--clip-grad", "0.05")


@pytest.fixture(scope="module")
def tp_runs(tiny_corpus, tmp_path_factory):
    """Every distributed run of this module: {job name: [rank results]} plus the flags and directories the tests
    need (two spawns instead of eleven)."""
    tmp = tmp_path_factory.mktemp("tp_runs")
    logits, labels = _ce_inputs()
    resume, convert = _resume_base(tiny_corpus, tmp), _convert_base(tiny_corpus, tmp)
    # the KD teacher (TP=1, padded to 144 rows) is trained here, before the spawn
    teacher = str(tmp / "teacher")
    pretrain(tiny_train_argv(tiny_corpus, tmp, "--num-layers", "3", "--train-iters", "3", "--save", teacher,
                             "--make-vocab-size-divisible-by", "48"))
    dirs = {"resume": str(tmp / "ckpt"), "tp2": str(tmp / "tp2"), "teacher": teacher}
    jobs = {
        "model-dense-learned": (_run_model, (False, False)),
        "model-moe-rope": (_run_model, (True, True)),
        "ce": (_ce, (logits.float(), labels)),
        "train-dense": (_train, (_train_argv(tiny_corpus, tmp, False) + ["--tensor-model-parallel-size", "2"],)),
        "train-moe": (_train, (_train_argv(tiny_corpus, tmp, True) + ["--tensor-model-parallel-size", "2"],)),
        "resume-straight": (_train, (resume + ["--train-iters", "6"],)),
        "resume-first": (_train, (resume + ["--train-iters", "6", "--exit-interval", "3", "--save", dirs["resume"],
                                            "--save-interval", "3"],)),
        "resume-second": (_train, (resume + ["--train-iters", "6", "--load", dirs["resume"]],)),
        "convert-straight": (_train, (convert + ["--tensor-model-parallel-size", "2"],)),
        "convert-save": (_train, (convert + ["--tensor-model-parallel-size", "2", "--exit-interval", "3", "--save",
                                             dirs["tp2"], "--save-interval", "3"],)),
        "kd": (_train, (_kd_argv(tiny_corpus, tmp, teacher) + ["--tensor-model-parallel-size", "2"],)),
        "bf16": (_train, (tiny_train_argv(tiny_corpus, tmp, "--train-iters", "6", "--bf16",
                                          "--tensor-model-parallel-size", "2", "--num-experts", "4",
                                          "--expert-interval", "2", "--attention-dropout", "0.1"),)),
    }
    results = dict(zip(jobs, run_distributed_jobs(list(jobs.values()), 2)))
    (results["tp2-dp2-ep2"],) = run_distributed_jobs(
        [(_train, (_dp_ep_argv(tiny_corpus, tmp) + ["--tensor-model-parallel-size", "2",
                                                    "--moe-expert-parallel-size", "2"],))], 4)
    return {"ranks": results, "dirs": dirs}


@pytest.mark.parametrize("rope,moe", [(False, False), (True, True)], ids=["dense-learned", "moe-rope"])
def test_tp2_model_equals_tp1(tp_runs, rope, moe):
    torch.manual_seed(11)
    ref = GPTModel(_cfg(rope), _moe_cfg(moe))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 96, (2, 12), generator=g)
    labels = torch.randint(0, 96, (2, 12), generator=g)
    out = ref(tokens, labels, return_logits=True)
    (out.loss.mean() + sum(s.aux_loss for s in out.moe_stats)).backward()
    ref_grads = _grads(ref)
    ranks = tp_runs["ranks"]["model-moe-rope" if moe else "model-dense-learned"]
    for r in ranks:
        torch.testing.assert_close(r["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["fused_loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logits"], out.logits.detach(), rtol=1e-5, atol=1e-5)
    sharded = 0
    for name, ref_w in ref.named_parameters():
        is_tp, dim, stride = ranks[0]["meta"][name]
        if is_tp:  # the shards put back together are the reference weight and gradient
            sharded += 1
            for key, want in (("weights", ref_w.detach()), ("grads", ref_grads[name]),
                              ("fused_grads", ref_grads[name])):
                got = merge_partitions([r[key][name] for r in ranks], dim, stride)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
        elif ".experts." in name:  # TP ranks dispatch disjoint token slices (issue 27): each holds a partial
            # gradient, summed over TP by the expert-DP reduction (its group spans the TP ranks)
            for r in ranks:
                torch.testing.assert_close(r["weights"][name], ref_w.detach(), rtol=0, atol=0)
            for key in ("grads", "fused_grads"):
                torch.testing.assert_close(sum(r[key][name] for r in ranks), ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=f"{key} {name}")
        else:  # replicated: whole and equal on both ranks
            for r in ranks:
                torch.testing.assert_close(r["weights"][name], ref_w.detach(), rtol=0, atol=0)
                for key in ("grads", "fused_grads"):
                    torch.testing.assert_close(r[key][name], ref_grads[name], rtol=1e-5, atol=1e-6,
                                               msg=f"{key} {name}")
    assert sharded >= 1 + 2 * 2 * (1 if moe else 2) - (1 if moe else 0)  # embedding + attention/MLP weights


def _ce(rank, world_size, logits, labels):
    groups = parallel_state.initialize(2, (1,))
    local = logits.chunk(2, dim=-1)[rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, groups.tp_group)
    (loss * torch.arange(1, loss.numel() + 1).view_as(loss)).sum().backward()
    return loss.detach(), local.grad


def test_vocab_parallel_cross_entropy_equals_full(tp_runs):
    logits, labels = _ce_inputs()
    full = logits.clone().requires_grad_(True)
    want = F.cross_entropy(full.view(-1, 10), labels.view(-1), reduction="none").view(5, 7)
    (want * torch.arange(1, 36).view(5, 7)).sum().backward()
    single = vocab_parallel_cross_entropy(logits, labels, None)
    torch.testing.assert_close(single.double(), want.detach(), rtol=1e-6, atol=1e-6)
    ranks = tp_runs["ranks"]["ce"]
    for loss, _ in ranks:
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    grad = torch.cat([grad for _, grad in ranks], dim=-1)
    torch.testing.assert_close(grad.double(), full.grad, rtol=1e-5, atol=1e-5)


def _train(rank, world_size, argv):
    r = pretrain(argv)
    st = r["state"]
    return {"losses": r["losses"], "grad_norms": r.get("grad_norms"),
            "weights": {k: v.detach().clone() for k, v in st.model.state_dict().items()},
            "meta": {n: (is_tensor_parallel_param(p), getattr(p, "partition_dim", None),
                         getattr(p, "partition_stride", 1)) for n, p in st.model.named_parameters()}}


def _assert_trained_weights_equal(ranks, ref_sd, skip=lambda name: False):
    """Each reference weight equals the TP ranks' shards merged (or the replicated copy), to 1e-4 / 1e-5."""
    for name, want in ref_sd.items():
        if skip(name):
            continue
        is_tp, dim, stride = ranks[0]["meta"].get(name, (False, None, 1))
        got = merge_partitions([r["weights"][name] for r in ranks], dim, stride) if is_tp else ranks[0]["weights"][name]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tp2_training_equals_tp1(tiny_corpus, tmp_path, tp_runs, moe):
    ref = pretrain(_train_argv(tiny_corpus, tmp_path, moe))  # TP=1; --clip-grad 0.05 clips every step, so the
    # global grad norm must be right
    ranks = tp_runs["ranks"]["train-moe" if moe else "train-dense"]
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    _assert_trained_weights_equal(ranks, ref["state"].model.state_dict())


def test_tp2_resume_is_exact_with_dropout(tp_runs):
    straight = tp_runs["ranks"]["resume-straight"]
    save = tp_runs["dirs"]["resume"]
    experts = [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
    assert sorted(os.listdir(os.path.join(save, "iter_0000003"))) == sorted(
        ["mp_rank_00", "mp_rank_01", "checksums.json"] + experts)
    from megatron import checkpointing

    # both TP ranks' dense files (each written by its own rank) and the experts are in the one checksum list
    assert sorted(checkpointing.read_manifest(os.path.join(save, "iter_0000003"))) == sorted(
        [f"mp_rank_0{r}/model_optim_rng.pt" for r in range(2)] + experts)
    resumed = tp_runs["ranks"]["resume-second"]
    for a, b in zip(straight, resumed):
        assert a["losses"][3:] == b["losses"]  # bitwise: weights, Adam, data position and both RNG streams
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k


def test_checkpoint_converted_between_tp_sizes_continues_training(tiny_corpus, tmp_path, tp_runs):
    """TP=2 for 3 steps, save, tools/checkpoint_tp.py to TP=1, 3 more steps in one process: the same losses as 6
    straight TP=2 steps (fp32 round-off; dropout off since the per-rank streams restart); then back to TP=2."""
    from tools.checkpoint_tp import main as convert_main

    base = _convert_base(tiny_corpus, tmp_path)
    straight = tp_runs["ranks"]["convert-straight"]
    save = tp_runs["dirs"]["tp2"]
    with pytest.raises(Exception, match="--tensor-model-parallel-size mismatch"):
        pretrain(base + ["--load", save])  # TP=1 run on a TP=2 checkpoint: refused, names the fix
    tp1 = str(tmp_path / "tp1")
    assert convert_main(["--load", save, "--save", tp1, "--target-tp", "1"]) == 0
    assert sorted(os.listdir(os.path.join(tp1, "iter_0000003"))) == sorted(["mp_rank_00", "checksums.json"] + [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)])
    # one-process loading merges the TP=2 shards in memory: the same model as the converted checkpoint
    from megatron.inference import load_model_for_inference

    merged, _, _ = load_model_for_inference(save)
    converted, _, _ = load_model_for_inference(tp1)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(merged(tokens).logits, converted(tokens).logits)
    resumed = pretrain(base + ["--load", tp1])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(straight[0]["losses"][3:]),
                               rtol=1e-5, atol=1e-5)
    back = str(tmp_path / "back")
    assert convert_main(["--load", tp1, "--save", back, "--target-tp", "2"]) == 0
    for r in range(2):  # TP=2 -> 1 -> 2 gives the original shards back
        a = torch.load(os.path.join(save, "iter_0000003", f"mp_rank_{r:02d}", "model_optim_rng.pt"), weights_only=True)
        b = torch.load(os.path.join(back, "iter_0000003", f"mp_rank_{r:02d}", "model_optim_rng.pt"), weights_only=True)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        for n in a["optimizer"]:
            for k, v in a["optimizer"][n].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"][n][k])), (n, k)
    assert convert_main(["--load", tp1, "--save", back, "--target-tp", "2"]) == 2  # never overwrites


def test_tp2_dp2_ep2_training_equals_single_process(tiny_corpus, tmp_path, tp_runs):
    """World 4 = TP 2 x DP 2, experts split over EP 2 within each TP rank's DP group: same losses and weights as
    one process (checks the group layout: TP pairs {0,1},{2,3}; DP/EP pairs {0,2},{1,3})."""
    ref = pretrain(_dp_ep_argv(tiny_corpus, tmp_path))
    ranks = tp_runs["ranks"]["tp2-dp2-ep2"]
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    ref_sd = ref["state"].model.state_dict()
    # dense weights from TP rank pair {0, 1}; local experts: EP rank 0 holds experts 0-1, EP rank 1 experts 2-3
    _assert_trained_weights_equal(ranks[:2], ref_sd, skip=lambda name: "expert" in name)
    for name, want in ref_sd.items():
        if "expert" in name and want.dim() > 0 and want.shape[0] == 4:
            # global ranks 0 and 2 are EP ranks 0 and 1 of TP rank 0's data-parallel group
            torch.testing.assert_close(torch.cat([ranks[0]["weights"][name], ranks[2]["weights"][name]]), want,
                                       rtol=1e-4, atol=1e-5, msg=name)


def test_tp2_distillation_equals_tp1(tiny_corpus, tmp_path, tp_runs):
    """KD with a TP=2 student: its vocabulary-slice logits against the matching slice of a whole (TP=1) teacher's,
    through the vocab-parallel KL; equal to the TP=1 run. The teacher is padded differently (144 rows vs the
    student's 128): both cover the true vocabulary (128), so the teacher is accepted."""
    ref = pretrain(_kd_argv(tiny_corpus, tmp_path, tp_runs["dirs"]["teacher"]))  # the fixture trained the teacher
    ranks = tp_runs["ranks"]["kd"]
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    _assert_trained_weights_equal(ranks, ref["state"].model.state_dict())


def test_vocab_slice_pads_past_the_teacher_vocabulary():
    from megatron.training import vocab_slice

    logits = torch.arange(12.0).view(1, 2, 6)
    assert torch.equal(vocab_slice(logits, 2, 2), logits[..., 2:4])
    assert torch.equal(vocab_slice(logits, 4, 4), torch.cat([logits[..., 4:], torch.zeros(1, 2, 2)], dim=-1))


def test_tp2_bf16_autocast_trains(tp_runs):
    """bf16 autocast at TP=2 (bf16 activations through the gloo collectives), MoE and attention dropout on:
    finite, falling losses, identical on both TP ranks."""
    import math

    ranks = tp_runs["ranks"]["bf16"]
    losses = ranks[0]["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert losses == ranks[1]["losses"]
