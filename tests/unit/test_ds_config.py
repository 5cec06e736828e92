"""--deepspeed --deepspeed_config: the DeepSpeed JSON the Megatron-DeepSpeed scripts generate maps onto the flags;
conflicts with explicit flags and unknown keys are reported, never dropped silently."""
import json
import re

import pytest

from megatron import ds_config
from megatron.arguments import parse_args, train_config_from_args
from megatron.errors import ConfigError

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--train-iters", "100"]


def template(**subst):
    """examples_deepspeed/MoE/ds_config_gpt_TEMPLATE.json with the scripts' sed substitutions."""
    v = {"CONFIG_BATCH_SIZE": 8, "CONFIG_MBSIZE": 2, "LOG_INTERVAL": 10, "ZERO_STAGE": 1, "PRESCALE_GRAD": True,
         "CONFIG_FP16_ENABLED": True, "CONFIG_BF16_ENABLED": False, "CONFIG_CL_ENABLED": True, "CONFIG_CL_MIN": 16,
         "CONFIG_CL_MAX": 64, "CONFIG_CL_DURATION": 20, **subst}
    return {
        "train_batch_size": v["CONFIG_BATCH_SIZE"], "train_micro_batch_size_per_gpu": v["CONFIG_MBSIZE"],
        "steps_per_print": v["LOG_INTERVAL"], "zero_optimization": {"stage": v["ZERO_STAGE"]},
        "gradient_clipping": 1.0, "prescale_gradients": v["PRESCALE_GRAD"],
        "fp16": {"enabled": v["CONFIG_FP16_ENABLED"], "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
                 "min_loss_scale": 1, "initial_scale_power": 11},
        "bf16": {"enabled": v["CONFIG_BF16_ENABLED"]},
        "curriculum_learning": {"enabled": v["CONFIG_CL_ENABLED"], "curriculum_type": "seqlen",
                                "min_difficulty": v["CONFIG_CL_MIN"], "max_difficulty": v["CONFIG_CL_MAX"],
                                "schedule_type": "fixed_linear",
                                "schedule_config": {"total_curriculum_step": v["CONFIG_CL_DURATION"],
                                                    "difficulty_step": 8}},
        "wall_clock_breakdown": False,
    }


def _write(tmp_path, cfg, name="ds.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return str(p)


def _cfg(tmp_path, ds, *flags, dp=1):
    args = parse_args(BASE + ["--deepspeed", "--deepspeed_config", _write(tmp_path, ds), *flags])
    return args, train_config_from_args(args, 128, dp_size=dp)


def test_template_maps_onto_the_config(tmp_path):
    args, cfg = _cfg(tmp_path, template(), dp=2)
    assert (cfg.data.global_batch_size, cfg.data.micro_batch_size) == (8, 2)
    assert cfg.logging.log_interval == 10 and cfg.parallel.zero_stage == 1 and cfg.optimizer.clip_grad == 1.0
    o = cfg.optimizer
    assert o.fp16 and not o.bf16 and o.loss_scale is None  # loss_scale 0 = dynamic (DeepSpeed)
    assert (o.initial_loss_scale, o.loss_scale_window, o.hysteresis, o.min_loss_scale) == (2.0 ** 11, 500, 2, 1.0)
    c = cfg.curriculum
    assert (c.min_difficulty, c.max_difficulty, c.schedule_type, c.total_curriculum_step, c.difficulty_step) == \
        (16, 64, "fixed_linear", 20, 8)
    assert not cfg.logging.wall_clock_breakdown
    assert any("prescale_gradients" in n and "changes nothing" in n for n in args.config_notes)
    # the same values given explicitly too (as the scripts do) are no conflict
    _cfg(tmp_path, template(), "--global-batch-size", "8", "--micro-batch-size", "2", "--clip-grad", "1",
         "--fp16", "--hysteresis", "2", "--log-interval", "10", "--zero-stage", "1", dp=2)
    # disabled curriculum and bf16
    _, cfg = _cfg(tmp_path, template(CONFIG_CL_ENABLED=False, CONFIG_FP16_ENABLED=False, CONFIG_BF16_ENABLED=True))
    assert cfg.curriculum is None and cfg.optimizer.bf16 and not cfg.optimizer.fp16


@pytest.mark.parametrize("flag,key", [
    (["--global-batch-size", "16"], r"train_batch_size = 8 conflicts with --global-batch-size 16"),
    (["--clip-grad", "0.5"], r"gradient_clipping = 1.0 conflicts with --clip-grad 0.5"),
    (["--loss-scale-window", "1000"], r"fp16.loss_scale_window = 500 conflicts with --loss-scale-window 1000"),
    (["--bf16"], r"bf16.enabled = false conflicts with --bf16 true"),
    (["--zero-stage", "2"], r"zero_optimization.stage = 1 conflicts with --zero-stage 2"),
])
def test_conflict_with_an_explicit_flag_is_one_line_naming_both(tmp_path, flag, key):
    with pytest.raises(ConfigError, match=key) as e:
        _cfg(tmp_path, template(), *flag)
    assert "\n" not in str(e.value) and "--deepspeed_config" in str(e.value)


def test_unknown_key_warns_naming_it_and_offload_blocks_map_onto_the_offload_flags(tmp_path):
    ds = template()
    ds["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/x", "buffer_count": 6}
    ds["zero_optimization"]["offload_param"] = {"device": "nvme"}
    ds["aio"] = {"block_size": 262144}
    ds["my_typo"] = 3
    ds["fp16"]["loss_scale_windwo"] = 7
    args, _ = _cfg(tmp_path, ds)
    notes = "\n".join(args.config_notes)
    assert "unknown key my_typo" in notes and "unknown key fp16.loss_scale_windwo" in notes
    # optimizer offload and the aio block map onto the --moe-offload-* flags (moe.offload.config); parameter offload
    # (ZeRO-3) does not exist here and says so
    assert (args.moe_offload_optimizer, args.moe_offload_dir, args.moe_offload_buffer_count,
            args.moe_offload_aio_block_size) == ("nvme", "/x", 6, 262144)
    assert "zero_optimization.offload_param.device is not supported here" in notes
    assert "offload_optimizer.device" not in notes and "aio.block_size" not in notes
    ds["zero_optimization"]["offload_optimizer"]["device"] = "cpu"
    with pytest.raises(ConfigError, match=r'--deepspeed_config: zero_optimization.offload_optimizer.device "cpu"'):
        _cfg(tmp_path, ds)


def test_optimizer_block_maps_onto_adam_flags(tmp_path):
    ds = {"train_batch_size": 4, "optimizer": {"type": "Adam", "params": {
        "lr": 0.00015, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.05, "max_grad_norm": 1.0}},
        "gradient_clipping": 1.0, "gradient_accumulation_steps": 2}
    _, cfg = _cfg(tmp_path, ds, "--micro-batch-size", "1", dp=2)
    o = cfg.optimizer
    assert (o.lr, o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.clip_grad) == \
        (0.00015, 0.8, 0.95, 1e-6, 0.05, 1.0)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps \(2\) x --micro-batch-size \(1\) x "
                                          r"data-parallel size \(1\) != the global batch size \(4\)"):
        _cfg(tmp_path, ds, "--micro-batch-size", "1", dp=1)
    ds["gradient_clipping"] = 0.5  # two keys for one flag must agree as well
    with pytest.raises(ConfigError, match=r"conflicts with gradient_clipping = 0.5|"
                                          r"gradient_clipping = 0.5 conflicts with optimizer.params.max_grad_norm"):
        _cfg(tmp_path, ds, "--micro-batch-size", "1", dp=2)
    with pytest.raises(ConfigError, match=r"optimizer.type 'OneBitAdam' is not available here"):
        _cfg(tmp_path, {"optimizer": {"type": "OneBitAdam", "params": {}}})


def test_scheduler_blocks(tmp_path):
    _, cfg = _cfg(tmp_path, {"scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 10, "warmup_type": "linear",
        "total_num_steps": 90}}})
    s = cfg.scheduler
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, s.lr_warmup_iters, s.lr_decay_iters, s.lr_decay_style) == \
        (0.001, 0.0, 10, 90, "linear")
    _, cfg = _cfg(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {
        "warmup_max_lr": 0.002, "warmup_num_steps": 5, "warmup_type": "linear"}}})
    assert (cfg.optimizer.lr, cfg.scheduler.lr_warmup_iters, cfg.scheduler.lr_decay_style) == (0.002, 5, "constant")
    with pytest.raises(ConfigError, match=r"WarmupLR with warmup_type 'log'"):
        _cfg(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}})
    # LRRangeTest / OneCycle go through issue 16's reader onto --lr-decay-style lr-range-test / one-cycle
    _, cfg = _cfg(tmp_path, {"scheduler": {"type": "OneCycle", "params": {
        "cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 7}}})
    s = cfg.scheduler
    assert (s.lr_decay_style, s.cycle_min_lr, s.cycle_max_lr, s.cycle_first_step_size) == ("one-cycle", 1e-4, 1e-3, 7)
    _, cfg = _cfg(tmp_path, {"scheduler": {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 1e-5}}})
    assert (cfg.scheduler.lr_decay_style, cfg.scheduler.lr_range_test_min_lr) == ("lr-range-test", 1e-5)
    with pytest.raises(ConfigError, match=r"one-cycle needs --cycle-min-lr and --cycle-max-lr"):
        _cfg(tmp_path, {"scheduler": {"type": "OneCycle", "params": {}}})
    args, _ = _cfg(tmp_path, {"scheduler": {"type": "WarmupCosineLR", "params": {}}})
    assert any("scheduler type 'WarmupCosineLR' is not supported here" in n for n in args.config_notes)


def test_unfilled_template_is_one_line(tmp_path):
    text = json.dumps(template()).replace('"stage": 1', '"stage": ZERO_STAGE')  # the MoS script forgets this sed
    with pytest.raises(ConfigError, match=r"not valid JSON at line 1 .*placeholder"):
        parse_args(BASE + ["--deepspeed", "--deepspeed_config", _write(tmp_path, text)])
    with pytest.raises(ConfigError, match=r"--deepspeed_config .*missing.json: cannot read it"):
        parse_args(BASE + ["--deepspeed", "--deepspeed_config", str(tmp_path / "missing.json")])
    with pytest.raises(ConfigError, match=r"zero_optimization.stage \(3\) is not supported"):
        _cfg(tmp_path, template(ZERO_STAGE=3))
    with pytest.raises(ConfigError, match=r"max_difficulty \(128\) must be <= --seq-length \(64\)"):
        from megatron.arguments import validate

        validate(_cfg(tmp_path, template(CONFIG_CL_MAX=128))[1], 1)


def test_one_typed_json_rule_for_every_key():
    """megatron/ds_config.json_value is the one reader of typed JSON values (top-level keys, the scheduler block,
    offload_optimizer/aio): a whole number is an int whether written 2 or 2.0; 2.5 and true are not; a bool is JSON
    true/false only; a float is any number. Errors start with the flag and name the key and the value."""
    from megatron.ds_config import json_value, offload_args_from_ds_config, scheduler_args_from_ds_config

    assert json_value("k", 2.0, int) == 2 and type(json_value("k", 2.0, int)) is int
    assert json_value("k", 3, float) == 3.0 and type(json_value("k", 3, float)) is float
    assert json_value("k", False, bool) is False
    for value, kind, want in ((2.5, int, "an integer"), (True, int, "an integer"), ("2", int, "an integer"),
                              (1, bool, "true or false"), (True, float, "a number"), (None, float, "a number")):
        with pytest.raises(ConfigError, match=rf"^--deepspeed_config: k \({re.escape(repr(value))}\) must be {want}$"):
            json_value("k", value, kind)
    # the same rule in the three blocks that used to disagree (2.0 for an integer key)
    sets, _ = ds_config.dest_values({"train_batch_size": 8.0})
    assert sets == [("train_batch_size", "global_batch_size", 8)]
    assert scheduler_args_from_ds_config({"type": "OneCycle", "params": {"cycle_first_step_size": 4.0}})[
        "cycle_first_step_size"] == 4
    assert offload_args_from_ds_config({"offload_optimizer": {"device": "nvme", "nvme_path": "/x",
                                                              "buffer_count": 6.0}},
                                       None)["moe_offload_buffer_count"] == 6
