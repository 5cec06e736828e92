"""DeepSpeed's LRRangeTest and OneCycle in the scheduler: LR and Adam beta1 sequences against DeepSpeed's formulas
written out here (and deepspeed.runtime.lr_schedules itself when importable), staircase modes, and the DeepSpeed
JSON `scheduler` block mapped onto the flags. (Exact resume mid-cycle: tests/integration/test_resume_exactness.py.)"""
import math

import pytest
import torch

from megatron.arguments import parse_args, train_config_from_args
from megatron.ds_config import scheduler_args_from_ds_config
from megatron.config import OptimizerConfig, SchedulerConfig
from megatron.errors import ConfigError
from megatron.optimizer import OptimizerParamScheduler

LRRT = [dict(lr_range_test_min_lr=1e-4, lr_range_test_step_size=7, lr_range_test_step_rate=3.0,
             lr_range_test_staircase=False),
        dict(lr_range_test_min_lr=2e-3, lr_range_test_step_size=5, lr_range_test_step_rate=0.5,
             lr_range_test_staircase=True)]
ONE_CYCLE = [
    dict(cycle_min_lr=1e-4, cycle_max_lr=1e-2, cycle_first_step_size=10, cycle_second_step_size=None,
         cycle_first_stair_count=0, cycle_second_stair_count=None, decay_step_size=4, decay_lr_rate=0.5,
         cycle_momentum=True, cycle_min_mom=0.85, cycle_max_mom=0.95, decay_mom_rate=0.01),
    # asymmetric halves with stairs (4 up, 3 down), no post-cycle decay
    dict(cycle_min_lr=3e-4, cycle_max_lr=3e-3, cycle_first_step_size=12, cycle_second_step_size=9,
         cycle_first_stair_count=4, cycle_second_stair_count=3, decay_step_size=0, decay_lr_rate=0.2,
         cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0.0),
]
STEPS = 40


def _scheduler(style, params, adam=True):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.0, betas=(0.9, 0.97)) if adam else torch.optim.SGD([p], lr=0.0)
    cfg = SchedulerConfig(lr_decay_style=style, train_iters=STEPS, **params)
    return OptimizerParamScheduler(opt, OptimizerConfig(lr=1.0), cfg)


def _sequence(s, steps=STEPS):
    """[(lr, betas)] for steps 0..steps: what the optimizer holds for each step about to run."""
    g = s.optimizer.param_groups[0]
    out = [(g["lr"], tuple(g.get("betas", ())))]
    for _ in range(steps):
        s.step()
        out.append((g["lr"], tuple(g.get("betas", ()))))
    return out


# ---- DeepSpeed's formulas, written out from deepspeed/runtime/lr_schedules.py (batch = steps done)
def _hand_lrrt(p, batch):
    interval = batch / p["lr_range_test_step_size"]
    if p["lr_range_test_staircase"]:
        interval = math.floor(interval)
    return p["lr_range_test_min_lr"] * (1 + p["lr_range_test_step_rate"] * interval)


def _hand_scale(p, batch):
    first = p["cycle_first_step_size"]
    second = p["cycle_second_step_size"] or first
    total = first + second
    if batch <= first:  # rising half (x <= step_ratio)
        scale, stairs, pos = batch / first, p["cycle_first_stair_count"], batch * p["cycle_first_stair_count"] / first
    else:
        n2 = p["cycle_second_stair_count"] if p["cycle_second_stair_count"] is not None else p["cycle_first_stair_count"]
        scale, stairs, pos = (total - batch) / second, n2, (total - batch) * n2 / second
    return math.floor(pos) / stairs if stairs > 0 else scale


def _hand_one_cycle(p, batch):
    total = p["cycle_first_step_size"] + (p["cycle_second_step_size"] or p["cycle_first_step_size"])
    if batch <= total:
        s = _hand_scale(p, batch)
        return (p["cycle_min_lr"] + (p["cycle_max_lr"] - p["cycle_min_lr"]) * s,
                p["cycle_max_mom"] - (p["cycle_max_mom"] - p["cycle_min_mom"]) * s)
    d = p["decay_step_size"]
    lr = p["cycle_min_lr"] if d == 0 or p["decay_lr_rate"] == 0 else \
        p["cycle_min_lr"] / (1 + p["decay_lr_rate"] * (batch - total) / d)
    mom = p["cycle_max_mom"] if d == 0 or p["decay_mom_rate"] == 0 else \
        p["cycle_max_mom"] * (1 + p["decay_mom_rate"] * (batch - total) / d)
    return lr, mom


@pytest.mark.parametrize("params", LRRT)
def test_lr_range_test_equals_deepspeed_formula(params):
    seq = _sequence(_scheduler("lr-range-test", params))
    for k, (lr, betas) in enumerate(seq):
        # the same float operations in the same order: only the division k / step_size may round differently
        assert lr == pytest.approx(_hand_lrrt(params, k), rel=1e-12), k
        assert betas == (0.9, 0.97)  # the range test leaves beta1 alone
    if params["lr_range_test_staircase"]:  # flat within each interval of step_size steps
        assert seq[0][0] == seq[4][0] < seq[5][0] == seq[9][0] < seq[10][0]


@pytest.mark.parametrize("params", ONE_CYCLE)
def test_one_cycle_lr_and_beta1_equal_deepspeed_formula(params):
    seq = _sequence(_scheduler("one-cycle", params))
    for k, (lr, betas) in enumerate(seq):
        want_lr, want_mom = _hand_one_cycle(params, k)
        assert lr == pytest.approx(want_lr, rel=1e-12), k
        assert betas[0] == pytest.approx(want_mom, rel=1e-12), k
        assert betas[1] == 0.97  # beta2 stays --adam-beta2 (DeepSpeed forces 0.99)
    first = params["cycle_first_step_size"]
    assert seq[first][0] == pytest.approx(params["cycle_max_lr"])  # the peak is reached, beta1 at its minimum
    assert seq[first][1][0] == pytest.approx(params["cycle_min_mom"])
    if params["cycle_first_stair_count"]:
        assert len({lr for lr, _ in seq[:first + 1]}) == params["cycle_first_stair_count"] + 1


def test_one_cycle_without_momentum_leaves_beta1():
    params = dict(ONE_CYCLE[0], cycle_momentum=False)
    assert all(b == (0.9, 0.97) for _, b in _sequence(_scheduler("one-cycle", params)))


def _deepspeed_schedules():
    try:
        from deepspeed.runtime import lr_schedules
    except Exception as e:  # not installed, or its import fails on this machine
        pytest.skip(f"deepspeed.runtime.lr_schedules not importable ({type(e).__name__}: {e})")
    return lr_schedules


@pytest.mark.parametrize("style,params", [("lr-range-test", p) for p in LRRT] + [("one-cycle", p) for p in ONE_CYCLE])
def test_sequences_equal_deepspeeds_own_schedulers(style, params):
    ds = _deepspeed_schedules()
    ours = _sequence(_scheduler(style, params))
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.0, betas=(0.9, 0.97))
    theirs = ds.LRRangeTest(opt, **params) if style == "lr-range-test" else ds.OneCycle(opt, **params)
    g = opt.param_groups[0]
    got = [(g["lr"], g["betas"][0])]
    for _ in range(STEPS):
        theirs.step()
        got.append((g["lr"], g["betas"][0]))
    for k, ((lr, betas), (ds_lr, ds_beta1)) in enumerate(zip(ours, got)):
        assert lr == pytest.approx(ds_lr, rel=1e-12), k
        if style == "one-cycle" and k > 0:
            assert betas[0] == pytest.approx(ds_beta1, rel=1e-12), k
    if style == "one-cycle":  # the documented difference: DeepSpeed starts beta1 at cycle_min_mom before step 1
        assert got[0][1] == params["cycle_min_mom"] and ours[0][1][0] == params["cycle_max_mom"]


@pytest.mark.parametrize("style,params", [("lr-range-test", LRRT[1]), ("one-cycle", ONE_CYCLE[1])])
def test_resume_mid_cycle_is_exact(style, params):
    straight = _sequence(_scheduler(style, params))
    a = _scheduler(style, params)
    first = _sequence(a, 13)  # mid-way down the second half of the cycle for ONE_CYCLE[1]
    b = _scheduler(style, params)
    b.load_state_dict(a.state_dict())
    rest = _sequence(b, STEPS - 13)
    assert first + rest[1:] == straight  # bit for bit: LR and betas are functions of the step count alone


def test_one_cycle_warmup_scales_the_first_steps():
    """--lr-warmup-iters W with one-cycle: steps 0..W-1 run at the cycle's LR x step / W (Megatron's warmup,
    LR 0 at the first update), then exactly DeepSpeed's OneCycle; beta1 keeps the cycle's values throughout."""
    params, warm = ONE_CYCLE[0], 4
    plain = _sequence(_scheduler("one-cycle", params))
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.0, betas=(0.9, 0.97))
    cfg = SchedulerConfig(lr_decay_style="one-cycle", train_iters=STEPS, lr_warmup_iters=warm, **params)
    warmed = _sequence(OptimizerParamScheduler(opt, OptimizerConfig(lr=1.0), cfg))
    for k, ((lr, betas), (lr0, betas0)) in enumerate(zip(warmed, plain)):
        assert betas == betas0
        assert lr == pytest.approx(lr0 * k / warm if k < warm else lr0, rel=1e-12, abs=0.0), k
    assert warmed[0][0] == 0.0 and warmed[warm][0] == plain[warm][0]
    with pytest.raises(ConfigError, match=r"one-cycle counts optimizer steps.*--lr-warmup-iters"):
        SchedulerConfig(lr_decay_style="one-cycle", train_iters=5, cycle_min_lr=0.1, cycle_max_lr=1.0,
                        lr_warmup_tokens=64)


def test_config_errors_name_the_flags():
    with pytest.raises(ConfigError, match=r"one-cycle needs --cycle-min-lr and --cycle-max-lr"):
        SchedulerConfig(lr_decay_style="one-cycle", train_iters=5)
    with pytest.raises(ConfigError, match=r"--lr-warmup-iters.*lr-range-test"):
        SchedulerConfig(lr_decay_style="lr-range-test", train_iters=5, lr_warmup_iters=2)
    with pytest.raises(ConfigError, match=r"--cycle-min-mom \(0.95\) and --cycle-max-mom \(0.9\)"):
        SchedulerConfig(lr_decay_style="one-cycle", train_iters=5, cycle_min_lr=0.1, cycle_max_lr=1.0,
                        cycle_min_mom=0.95)
    with pytest.raises(ConfigError, match=r"--lr-range-test-step-size \(0\) must be >= 1"):
        SchedulerConfig(lr_decay_style="lr-range-test", train_iters=5, lr_range_test_step_size=0)


# ---- the DeepSpeed JSON `scheduler` block
def test_ds_config_block_maps_onto_the_flags():
    base = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "4",
            "--train-iters", "40"]
    for style, params in [("lr-range-test", p) for p in LRRT] + [("one-cycle", p) for p in ONE_CYCLE]:
        kind = "LRRangeTest" if style == "lr-range-test" else "OneCycle"
        given = {k: v for k, v in params.items() if v is not None}
        mapped = scheduler_args_from_ds_config({"type": kind, "params": given})
        assert mapped["lr_decay_style"] == style
        args = parse_args(base)
        for dest, value in mapped.items():
            assert hasattr(args, dest), dest  # every mapped key is an argparse dest of this CLI
            setattr(args, dest, value)
        cfg = train_config_from_args(args, padded_vocab_size=64).scheduler
        assert cfg == SchedulerConfig(lr_decay_style=style, train_iters=40, lr_decay_iters=40, **params)
    # JSON integers for float params and integral floats for int params are accepted, as DeepSpeed's Python does
    got = scheduler_args_from_ds_config({"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1,
                                                                        "cycle_first_step_size": 100.0}})
    assert got == {"lr_decay_style": "one-cycle", "cycle_min_lr": 0.0, "cycle_max_lr": 1.0,
                   "cycle_first_step_size": 100}


@pytest.mark.parametrize("block,match", [
    ({"type": "WarmupLR", "params": {}}, r"scheduler.type \('WarmupLR'\) is not supported"),
    ({"params": {}}, r"must be an object with a \"type\""),
    ({"type": "OneCycle", "params": {"lr_range_test_min_lr": 1e-3}}, r"lr_range_test_min_lr is not a OneCycle"),
    ({"type": "LRRangeTest", "params": {"lr_range_test_step_size": 2.5}}, r"step_size \(2.5\) must be an integer"),
    ({"type": "LRRangeTest", "params": {"lr_range_test_staircase": 1}}, r"staircase \(1\) must be true or false"),
    ({"type": "OneCycle", "params": {"cycle_max_lr": "1e-3"}}, r"cycle_max_lr \('1e-3'\) must be a number"),
])
def test_ds_config_block_errors_name_the_key(block, match):
    with pytest.raises(ConfigError, match=match):
        scheduler_args_from_ds_config(block)
