"""Bad MoE settings fail early with a ValueError that names the CLI flag."""
import pytest

from moe import MoE, MoEConfig, MoELayer


def test_defaults_and_single_value_num_experts():
    cfg = MoEConfig(num_experts=8)
    assert cfg.num_experts == (8,) and cfg.num_experts_for_layer(3) == 8
    assert cfg.expert_interval == 2 and cfg.topk == 1 and cfg.min_capacity == 4 and cfg.drop_tokens
    assert MoEConfig(num_experts=(4, 8)).num_experts_for_layer(1) == 8


def test_ep_size_one_for_all_or_per_layer():
    cfg = MoEConfig(num_experts=4, ep_size=2)  # an int is kept working (the DeepSpeed-style MoE wrapper)
    assert cfg.ep_size == (2,) and cfg.ep_size_for_layer(0) == 2 and cfg.ep_size_for_layer(5) == 2
    cfg = MoEConfig(num_experts=(2, 4, 8), ep_size=(1, 2, 4))
    assert [cfg.ep_size_for_layer(i) for i in range(3)] == [1, 2, 4]
    assert MoEConfig(num_experts=8, ep_size=[2, 4]).ep_size == (2, 4)  # lists, as read back from a checkpoint
    assert MoEConfig().ep_size == (1,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=6, ep_size=4), r"--num-experts \(6\) must be divisible by --moe-expert-parallel-size \(4\)"),
    (dict(num_experts=(8, 6), ep_size=4), r"--num-experts \(6\)"),
    (dict(num_experts=4, topk=5), r"--topk \(5\)"),
    (dict(num_experts=4, topk=0), r"--topk \(0\)"),
    (dict(num_experts=4, train_capacity_factor=0.0), r"--moe-train-capacity-factor \(0.0\) must be > 0"),
    (dict(num_experts=4, eval_capacity_factor=-1.0), r"--moe-eval-capacity-factor \(-1.0\)"),
    (dict(num_experts=4, min_capacity=-1), r"--moe-min-capacity \(-1\)"),
    (dict(num_experts=4, ep_size=0), r"--moe-expert-parallel-size \(0\)"),
    (dict(num_experts=(4, 2), ep_size=(2, 4)),
     r"--num-experts \(2\) must be divisible by --moe-expert-parallel-size \(4\) at MoE layer 1"),
    (dict(num_experts=(4, 4, 4), ep_size=(1, 2)), r"--num-experts \(3 values\) and --moe-expert-parallel-size \(2"),
    (dict(num_experts=4, noisy_gate_policy="Gumbel"), r"--moe-noisy-gate-policy"),
    (dict(num_experts=0), r"--num-experts"),
])
def test_config_errors_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_layer_is_built_as_one_of_its_configs_layers():
    """MoEConfig checks experts % EP and the top-k range once; a layer only checks it is one of the config's layers."""
    cfg = MoEConfig(num_experts=4, topk=2)
    with pytest.raises(ValueError, match=r"MoELayer\(num_experts=1\) with an ep_group of 1 rank\(s\) is not a MoE "
                                         r"layer of its MoEConfig \(--num-experts \[4\]"):
        MoELayer(8, 16, 1, cfg)
    MoELayer(8, 16, 8, MoEConfig(num_experts=(4, 8), topk=2))  # the second layer of a pyramid config
    with pytest.raises(ValueError, match=r"--moe-expert-parallel-size \(2\) does not match"):
        MoELayer(8, 16, 4, MoEConfig(num_experts=4, ep_size=2))
    with pytest.raises(ValueError, match=r"--moe-expert-parallel-size \(\[2, 4\]\) does not match"):
        MoELayer(8, 16, 4, MoEConfig(num_experts=4, ep_size=(2, 4)))


def test_deepspeed_wrapper_errors():
    with pytest.raises(ValueError, match="--topk"):
        MoE(8, num_experts=2, k=3)
    with pytest.raises(ValueError, match="--moe-train-capacity-factor"):
        MoE(8, num_experts=2, capacity_factor=0)
    with pytest.raises(ValueError, match="--num-experts"):
        MoE(8, num_experts=3, ep_size=2)


def test_routing_choices_default_to_deepspeed_and_old_checkpoints_keep_theirs():
    """New configs route as DeepSpeed (per-k drop policy and aux-loss choices); a config recorded before these fields
    existed loads with the routing and expert activation it was trained with (moe.config.LEGACY_ROUTING)."""
    import dataclasses

    from moe.config import LEGACY_ROUTING

    assert [MoEConfig(num_experts=4, topk=k).drop_policy for k in (1, 2, 3)] == ["any", "position", "probs"]
    assert [MoEConfig(num_experts=4, topk=k).aux_loss_choices for k in (1, 2, 3)] == ["first", "first", "all"]
    cfg = MoEConfig(num_experts=4, topk=2)
    assert (cfg.renormalize, cfg.second_expert_sampling, cfg.rts_scope, cfg.expert_activation) == \
        ("after_drop", True, "top1", None)
    assert MoEConfig(num_experts=4, noisy_gate_policy="None").noisy_gate_policy is None  # DeepSpeed's string
    recorded = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LEGACY_ROUTING}
    old = MoEConfig.from_recorded(recorded)
    assert {k: getattr(old, k) for k in LEGACY_ROUTING} == LEGACY_ROUTING
    assert MoEConfig.from_recorded(dataclasses.asdict(cfg)) == cfg  # a new checkpoint round-trips
    with pytest.raises(ValueError, match=r"--moe-token-drop-policy \('first'\) must be one of"):
        MoEConfig(num_experts=4, drop_policy="first")
