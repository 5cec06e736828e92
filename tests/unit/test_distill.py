"""MoS / KD: the KD loss against a hand computation, the KL's gradient and padding, config checks, the staged
teacher stop, and teacher loading from a checkpoint (shape mismatches name the teacher flag)."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe.distill import DistillConfig, TeacherRunner, kd_loss, validate_distill, vocab_parallel_kl_div


def _cfg(**kw):
    base = dict(mos=True, load_teacher="/ckpt/teacher")
    base.update(kw)
    return DistillConfig(**base)


# ----------------------------------------------------------------------------------------------- loss
def test_kd_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, s, v, T, alpha, beta = 2, 3, 5, 2.0, 0.7, 0.3
    student = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    lm = torch.tensor(2.5, dtype=torch.float64)
    total, kd_term = kd_loss(lm, student, teacher, mask, _cfg(kd_temp=T, kd_alpha_ce=alpha, kd_beta_ce=beta))

    def softmax(row):
        z = [math.exp(x / T) for x in row]
        return [x / sum(z) for x in z]

    kls = []
    for i in range(b):
        for j in range(s):
            if mask[i, j] == 0:
                continue
            pt, ps = softmax(teacher[i, j].tolist()), softmax(student[i, j].tolist())
            kls.append(sum(a * (math.log(a) - math.log(c)) for a, c in zip(pt, ps)))
    want_kd = T * T * sum(kls) / len(kls)  # T^2 · mean over the 4 unmasked tokens
    want_total = alpha * 2.5 + beta * want_kd
    # fp64 throughout (the KL keeps fp64 inputs in fp64); only summation order differs from the loops
    assert kd_term.item() == pytest.approx(want_kd, rel=1e-12)
    assert total.item() == pytest.approx(want_total, rel=1e-12)


def test_kl_equals_torch_kl_div_and_fp32_for_half_inputs():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 11, generator=g)
    teacher = torch.randn(2, 4, 11, generator=g)
    ref = F.kl_div(F.log_softmax(student / 1.5, -1), F.log_softmax(teacher / 1.5, -1), log_target=True,
                   reduction="none").sum(-1)
    got = vocab_parallel_kl_div(student, teacher, 1.5)
    # fp32, 11-way softmax: the two formulas differ by rounding only (~1e-7 per term)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    half = vocab_parallel_kl_div(student.bfloat16(), teacher.bfloat16(), 1.5)
    assert half.dtype == torch.float32


def test_kl_gradient_is_exact():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_kl_div(x, teacher, 2.0), (student,))
    # closed form: d KL / d s = (softmax(s/T) - softmax(t/T)) / T
    vocab_parallel_kl_div(student, teacher, 2.0).sum().backward()
    want = (torch.softmax(student.detach() / 2.0, -1) - torch.softmax(teacher / 2.0, -1)) / 2.0
    torch.testing.assert_close(student.grad, want, rtol=1e-12, atol=1e-12)


def test_padded_vocab_columns_are_excluded():
    """Columns >= vocab_size (Megatron padding) get probability 0 and zero gradient, whatever their logits."""
    g = torch.Generator().manual_seed(3)
    real_s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    real_t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    student = torch.cat([real_s, torch.full((2, 3, 3), 50.0, dtype=torch.float64)], -1).requires_grad_()
    teacher = torch.cat([real_t, torch.full((2, 3, 3), -50.0, dtype=torch.float64)], -1)
    got = vocab_parallel_kl_div(student, teacher, 1.0, vocab_size=5)
    torch.testing.assert_close(got, vocab_parallel_kl_div(real_s, real_t, 1.0), rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[..., 5:], torch.zeros(2, 3, 3, dtype=torch.float64))


def test_kl_of_identical_distributions_is_zero():
    x = torch.randn(1, 2, 9)
    torch.testing.assert_close(vocab_parallel_kl_div(x, x.clone(), 3.0), torch.zeros(1, 2), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw,match", [
    (dict(kd_temp=0.0), r"--kd-temp \(0.0\) must be > 0"),
    (dict(load_teacher=None), r"--mos needs --load-teacher"),
    (dict(mos=False, kd=True, load_teacher=None), r"--kd needs --load-teacher"),
    (dict(kd=True), r"--mos and --kd are mutually exclusive"),
    (dict(kd_stop_iters=10, kd_stop_tokens=100), r"--mos-kd-stop-iters \(10\) and --mos-kd-stop-tokens \(100\) "
                                                 r"are mutually exclusive"),
    (dict(kd_stop_iters=0), r"--mos-kd-stop-iters \(0\) must be >= 1"),
    (dict(kd_alpha_ce=-1.0), r"--kd-alpha-ce \(-1.0\)"),
    (dict(num_experts_teacher=(4, 0)), r"--num-experts-teacher \(\[4, 0\]\)"),
    (dict(hidden_size_teacher=30, num_attention_heads_teacher=4),
     r"--hidden-size-teacher \(30\) must be divisible by --num-attention-heads-teacher \(4\)"),
    (dict(mos=False), r"--load-teacher \(/ckpt/teacher\) has no effect without --mos or --kd"),
])
def test_config_errors_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_config_defaults_and_cross_checks():
    off = DistillConfig()
    assert not off.enabled and off.kd_temp == off.kd_alpha_ce == off.kd_beta_ce == 1.0
    assert _cfg(num_experts_teacher=[8]).num_experts_teacher == (8,)
    assert [_cfg(kd_stop_iters=3).kd_stopped(i, 0) for i in (2, 3)] == [False, True]
    assert [_cfg(kd_stop_tokens=300).kd_stopped(9, t) for t in (299, 300)] == [False, True]
    assert not _cfg().kd_stopped(10 ** 9, 10 ** 12)
    validate_distill(_cfg(), (4,))
    validate_distill(_cfg(mos=False, kd=True), (1,))
    with pytest.raises(ValueError, match=r"--mos distils into an MoE student, but --num-experts is \[1\]"):
        validate_distill(_cfg(), (1,))
    with pytest.raises(ValueError, match=r"--kd distils into a dense student"):
        validate_distill(_cfg(mos=False, kd=True), (2,))


# ----------------------------------------------------------------------------------------------- runner
class _Logits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, tokens):
        return self.drop(self.emb(tokens))


def _run_schedule(runner, iters=6, micro=2, tokens_per_iter=100):
    """The training loop's use of the runner: one teacher forward per micro-batch while active."""
    used = []
    for it in range(iters):
        active = runner.active(it, it * tokens_per_iter)
        used.append(active)
        for _ in range(micro):
            if active:
                runner.forward(torch.zeros(1, 4, dtype=torch.long))
    return used


def test_staged_stop_by_iterations():
    runner = TeacherRunner(_Logits(), _cfg(kd_stop_iters=3))
    assert _run_schedule(runner) == [True] * 3 + [False] * 3
    assert runner.forward_count == 3 * 2  # 3 iterations x 2 micro-batches, none after the stop
    assert runner.model is None  # released for the rest of training
    with pytest.raises(RuntimeError, match="released"):
        runner.forward(torch.zeros(1, 4, dtype=torch.long))


def test_staged_stop_by_tokens_and_no_stop():
    runner = TeacherRunner(_Logits(), _cfg(kd_stop_tokens=250))  # tokens before step: 0, 100, 200 < 250
    assert _run_schedule(runner) == [True] * 3 + [False] * 3 and runner.forward_count == 6
    always = TeacherRunner(_Logits(), _cfg())
    assert all(_run_schedule(always)) and always.forward_count == 12


def test_teacher_runs_frozen_in_eval():
    model = _Logits().train()
    runner = TeacherRunner(model, _cfg())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()  # e.g. reached by a parent's .train(): forward must put it back in eval (no dropout)
    x = torch.arange(8).view(2, 4)
    out = runner.forward(x)
    assert not model.training and not out.requires_grad
    assert torch.equal(out, model.emb(x))


# ----------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory):
    """A 2-layer MoE teacher (hidden 32, 4 heads, 2 experts in its one MoE layer) saved the way training saves
    it (checkpointing.save_checkpoint with the dataclasses recorded as dicts, as configs_for_checkpoint does).
    Built directly rather than with pretrain(): the same files in a fraction of the time."""
    import dataclasses

    from megatron import checkpointing
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from moe.config import MoEConfig

    torch.manual_seed(0)
    mcfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=32,
                       max_position_embeddings=32, padded_vocab_size=128)
    moe_cfg = MoEConfig(num_experts=(2,), expert_interval=2, eval_capacity_factor=2.0)
    model = GPTModel(mcfg, moe_cfg)
    save = str(tmp_path_factory.mktemp("teacher") / "ckpt")
    configs = {"model": dataclasses.asdict(mcfg), "moe": dataclasses.asdict(moe_cfg)}
    checkpointing.save_checkpoint(save, 3, model, None, None, None, {"consumed_samples": 0, "consumed_tokens": 0},
                                  configs)
    return {"path": save, "padded": 128, "model": model.eval()}


def test_load_teacher_matches_checkpoint(moe_teacher):
    from megatron.distillation import load_teacher

    cfg = _cfg(load_teacher=moe_teacher["path"], num_layers_teacher=2, hidden_size_teacher=32,
               num_attention_heads_teacher=4, num_experts_teacher=(2,))
    rng = torch.get_rng_state()
    runner = load_teacher(cfg, moe_teacher["padded"], seq_length=32)
    assert torch.equal(torch.get_rng_state(), rng)  # building the teacher leaves the global RNG alone (resume)
    model = runner.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    gates = [m for m in model.modules() if type(m).__name__ == "TopKRouter"]
    assert gates and all(m.cfg.eval_capacity_factor == 2.0 for m in gates)  # the teacher's recorded eval cf
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    # same weights, same eval-mode routing: bit-identical logits to the model that was saved
    assert torch.equal(runner.forward(tokens), moe_teacher["model"](tokens).logits)
    assert runner.forward_count == 1


@pytest.mark.parametrize("kw,flag", [
    (dict(num_layers_teacher=3), "--num-layers-teacher (3)"),
    (dict(hidden_size_teacher=64), "--hidden-size-teacher (64)"),
    (dict(num_attention_heads_teacher=8), "--num-attention-heads-teacher (8)"),
    (dict(num_experts_teacher=(4,)), "--num-experts-teacher ([4])"),
])
def test_teacher_shape_mismatch_names_the_flag(moe_teacher, kw, flag):
    from megatron.checkpointing import CheckpointError
    from megatron.distillation import load_teacher

    with pytest.raises(CheckpointError) as e:
        load_teacher(_cfg(load_teacher=moe_teacher["path"], **kw), moe_teacher["padded"])
    msg = str(e.value)
    assert msg.startswith(flag) and "does not match the teacher checkpoint" in msg and "\n" not in msg, msg


def test_teacher_vocab_and_path_errors(moe_teacher, tmp_path):
    from megatron.checkpointing import CheckpointError
    from megatron.distillation import load_teacher

    with pytest.raises(CheckpointError, match=r"padded vocabulary \(\d+\) differs from the student's \(999\)"):
        load_teacher(_cfg(load_teacher=moe_teacher["path"]), 999)
    with pytest.raises(CheckpointError, match=r"--seq-length \(64\) exceeds the teacher's --max-position-embeddings"):
        load_teacher(_cfg(load_teacher=moe_teacher["path"]), moe_teacher["padded"], seq_length=64)
    missing = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"^--load-teacher {missing}: no such directory$"):
        load_teacher(_cfg(load_teacher=missing), moe_teacher["padded"])
