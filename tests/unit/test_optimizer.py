"""LR schedule, loss scaler, parameter groups and gradient clipping against hand computations."""
import math

import pytest
import torch

from megatron.config import OptimizerConfig, SchedulerConfig
from megatron.optimizer import (DynamicLossScaler, OptimizerParamScheduler, build_optimizer, clip_grad_norm,
                                param_groups)
from megatron.optimizer.grad_scaler import unscale_and_check


def _sched(style, warmup=10, decay=110, lr=1.0, min_lr=0.1):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return OptimizerParamScheduler(opt, OptimizerConfig(lr=lr, min_lr=min_lr),
                                   SchedulerConfig(lr_decay_style=style, train_iters=200, lr_warmup_iters=warmup,
                                                   lr_decay_iters=decay))


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_schedule_matches_hand_values(style):
    s = _sched(style)
    lrs = [s.get_lr()] + [s.step() for _ in range(150)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    if style == "constant":
        assert lrs[60] == lrs[150] == 1.0
    elif style == "linear":  # halfway through decay: min + 0.5 (max - min)
        assert lrs[60] == pytest.approx(0.1 + 0.5 * 0.9) and lrs[110] == pytest.approx(0.1)
    else:  # cosine at a quarter: min + 0.5 (1 + cos(pi/4)) (max - min)
        assert lrs[35] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    if style != "constant":
        assert lrs[150] == pytest.approx(0.1)
    assert s.optimizer.param_groups[0]["lr"] == lrs[-1]


def test_schedule_resumes_from_state():
    a = _sched("cosine")
    for _ in range(37):
        a.step()
    b = _sched("cosine")
    b.load_state_dict(a.state_dict())
    assert [a.step() for _ in range(20)] == [b.step() for _ in range(20)]


def test_dynamic_loss_scaler_hysteresis_and_growth():
    s = DynamicLossScaler(2.0 ** 16, min_scale=1.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 2.0 ** 16  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 2.0 ** 15
    for _ in range(3):
        s.update(False)
    assert s.scale == 2.0 ** 16


def test_unscale_detects_inf_and_unscales():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([2.0, 4.0, 8.0])
    assert not unscale_and_check([p], 2.0) and torch.equal(p.grad, torch.tensor([1.0, 2.0, 4.0]))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert unscale_and_check([p], 2.0)


def test_param_groups_no_decay_on_bias_and_norm():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m[0].weight.expert_parallel = False
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    assert [p.shape for p in groups["dense_decay"]["params"]] == [torch.Size([4, 4])]
    assert groups["dense_decay"]["weight_decay"] == 0.1 and groups["dense_no_decay"]["weight_decay"] == 0.0
    assert len(groups["dense_no_decay"]["params"]) == 3


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(5) * 3
    ref = [p.grad.clone() for p in ps]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for rp, g in zip(ref_params, ref):
        rp.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
    got = clip_grad_norm(ps[:2], ps[2:], 1.0)
    assert got == pytest.approx(float(want), rel=1e-6)
    for p, rp in zip(ps, ref_params):
        torch.testing.assert_close(p.grad, rp.grad)


def test_adamw_step_matches_the_update_rule_written_out():
    """Two AdamW steps against the rule by hand in float64 (decoupled decay on the weight, none on the bias)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3).double()
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.95, 1e-8
    opt = build_optimizer(m, OptimizerConfig(lr=lr, weight_decay=wd, adam_beta1=b1, adam_beta2=b2, adam_eps=eps,
                                              clip_grad=0.0))  # step() clips by --clip-grad: off for the rule
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    mom = {n: torch.zeros_like(p) for n, p in ref.items()}
    var = {n: torch.zeros_like(p) for n, p in ref.items()}
    for step in (1, 2):
        opt.zero_grad()
        m(torch.randn(5, 4, dtype=torch.float64)).square().sum().backward()
        for n, p in m.named_parameters():
            g = p.grad
            decay = wd if n == "weight" else 0.0
            ref[n] = ref[n] * (1 - lr * decay)
            mom[n] = b1 * mom[n] + (1 - b1) * g
            var[n] = b2 * var[n] + (1 - b2) * g * g
            m_hat, v_hat = mom[n] / (1 - b1 ** step), var[n] / (1 - b2 ** step)
            ref[n] = ref[n] - lr * m_hat / (v_hat.sqrt() + eps)
        opt.step()
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-12, atol=1e-12)  # float64: rounding only


def test_step_reports_overflow_and_non_finite_and_leaves_the_weights():
    """MegatronOptimizer.step: an fp16 overflow (inf gradient with a loss scale) and, without a scale, a non-finite
    norm under --check-for-nan-in-loss-and-grad skip the update and say why; a finite step unscales and clips."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = build_optimizer(m, OptimizerConfig(lr=1e-2, clip_grad=1.0))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for scale, bad, want in ((4.0, float("inf"), dict(overflow=True)), (None, float("nan"), dict(non_finite=True))):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        m.weight.grad[0, 0] = bad
        r = opt.step(scale)
        assert not r.stepped and all(getattr(r, k) == v for k, v in want.items()), r
        assert all(torch.equal(p, before[n]) for n, p in m.named_parameters()) and not opt.state
    for p in m.parameters():
        p.grad = torch.full_like(p, 8.0)  # scaled by 4: unscaled 2.0 each, norm 2 * sqrt(8 elements) -> clipped to 1
    r = opt.step(4.0)
    norm = 2.0 * math.sqrt(8.0)
    assert r.stepped and not r.overflow and abs(r.grad_norm - norm) < 1e-5  # fp32 rounding of the norm
    torch.testing.assert_close(m.weight.grad, torch.full_like(m.weight, 2.0 / norm), rtol=1e-5, atol=0)


def test_state_dict_is_the_checkpoint_layout():
    """state_dict() is {parameter name: {step, exp_avg, exp_avg_sq}} of whole parameters (copies), and
    load_state_dict of it into a fresh optimizer gives the same next update."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = build_optimizer(m, OptimizerConfig(lr=1e-2, clip_grad=0.0))
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd) == ["bias", "weight"] and set(sd["weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["weight"]["exp_avg"].data_ptr() != opt.state[m.weight]["exp_avg"].data_ptr()  # a copy
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(m.state_dict())
    opt2 = build_optimizer(m2, OptimizerConfig(lr=1e-2, clip_grad=0.0))
    opt2.load_state_dict(sd, "test")
    for model in (m, m2):
        model.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
    opt.step()
    opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
