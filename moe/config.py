"""`MoEConfig`: the frozen settings of every MoE layer, checked once before any module is built."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
MLP_TYPES = ("standard", "residual")
DROP_POLICIES = ("position", "probs", "any")
RENORMALIZE = ("after_drop", "before_drop")
RTS_SCOPES = ("top1", "train")
AUX_LOSS_CHOICES = ("first", "all")
ACTIVATIONS = ("gelu_tanh", "gelu")

# What a checkpoint written before these fields existed (issue 14) was trained with; MoEConfig.from_recorded fills
# them in so an old checkpoint keeps its routing and expert function.
LEGACY_ROUTING = {"drop_policy": "probs", "renormalize": "before_drop", "second_expert_sampling": False,
                  "rts_scope": "train", "aux_loss_choices": "first", "expert_activation": "gelu"}


def deepspeed_drop_policy(topk: int) -> str:
    """DeepSpeed's drop order for top-k: top1gating keeps what torch.topk returns over equal scores ('any'),
    top2gating keeps every first choice before any second choice in token order ('position'), topkgating keeps
    the highest router probabilities ('probs')."""
    return "any" if topk == 1 else ("position" if topk == 2 else "probs")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts settings (Megatron-DeepSpeed flag spellings in the error messages)."""

    num_experts: Union[int, Tuple[int, ...]] = (1,)  # experts per MoE layer: one for all, or one per layer (Pyramid)
    expert_interval: int = 2  # an MoE layer replaces the MLP every this many transformer layers
    topk: int = 1  # experts chosen per token (k)
    ep_size: Union[int, Tuple[int, ...]] = (1,)  # EP size (ranks splitting a layer's experts): one, or one per layer
    train_capacity_factor: float = 1.0  # capacity multiplier in training (slots per expert = k*T/E * cf)
    eval_capacity_factor: float = 1.0  # capacity multiplier in eval()
    min_capacity: int = 4  # lower bound on slots per expert (tokens)
    loss_coeff: float = 0.01  # weight of the aux (load-balancing) loss in the total loss
    drop_tokens: bool = True  # False = dropless: every routed token is computed, no capacity
    z_loss_coeff: float = 0.0  # weight of the router z-loss (ST-MoE); 0 disables it
    noisy_gate_policy: Optional[str] = None  # router noise in training: 'Jitter', 'RSample' or None
    use_rts: bool = True  # random token selection: uniform random drop priority (where rts_scope applies)
    mlp_type: str = "standard"  # 'standard' MoE or 'residual' (Residual-MoE: dense MLP beside the MoE)
    # --- routing choices; the defaults are DeepSpeed's (deepspeed/moe/sharded_moe.py) ---
    drop_policy: Optional[str] = None  # which pairs an over-full expert keeps: 'position' (every first choice
    #   before any second, then token order), 'probs' (highest router probability), 'any' (torch.topk over equal
    #   scores, DeepSpeed top-1 without RTS); None = DeepSpeed's choice for topk (deepspeed_drop_policy)
    renormalize: str = "after_drop"  # k >= 2 gates: divided by the sum over the KEPT choices ('after_drop',
    #   DeepSpeed: a token whose 2nd choice was dropped gets weight 1.0) or over all k ('before_drop')
    second_expert_sampling: bool = True  # top-2: 2nd expert = argmax(logits + Gumbel noise), training and eval
    rts_scope: str = "top1"  # where use_rts applies: 'top1' (top-1 routers, training and eval: DeepSpeed) or
    #   'train' (any k, training only)
    aux_loss_choices: Optional[str] = None  # the load fraction in the aux loss counts 'first' choices or 'all'
    #   k (divided by k); None = DeepSpeed's ('first' for k <= 2, 'all' for k > 2)
    expert_activation: Optional[str] = None  # built-in experts' activation: 'gelu_tanh' or 'gelu' (exact erf);
    #   None = the dense MLP's (ModelConfig.activation; 'gelu_tanh' in moe.MoE)
    # --- dispatch (issue 23) ---
    pad_to_capacity: Optional[bool] = None  # capacity mode, one rank: every expert computes exactly C rows (empty
    #   slots computed and discarded), so no shape depends on routing and the layer needs no host sync; None = on
    #   for CUDA inputs with resident experts (--[no-]moe-pad-expert-input-to-capacity)

    def __post_init__(self):
        num_experts = _as_tuple(self.num_experts)
        ep_sizes = _as_tuple(self.ep_size)
        object.__setattr__(self, "num_experts", num_experts)
        object.__setattr__(self, "ep_size", ep_sizes)
        if not num_experts or any((not isinstance(n, int)) or n < 1 for n in num_experts):
            raise ValueError(f"--num-experts ({list(num_experts)}) must be one or more positive integers")
        if self.expert_interval < 1:
            raise ValueError(f"--expert-interval ({self.expert_interval}) must be >= 1")
        if not ep_sizes:
            raise ValueError("--moe-expert-parallel-size needs one value, or one per MoE layer")
        for p in ep_sizes:
            if not isinstance(p, int) or p < 1:
                raise ValueError(f"--moe-expert-parallel-size ({p}) must be a positive integer")
        if len(num_experts) > 1 and len(ep_sizes) > 1 and len(num_experts) != len(ep_sizes):
            raise ValueError(f"--num-experts ({len(num_experts)} values) and --moe-expert-parallel-size "
                             f"({len(ep_sizes)} values) must each give one value, or one per MoE layer")
        for i in range(max(len(num_experts), len(ep_sizes))):
            n, p = self.num_experts_for_layer(i), self.ep_size_for_layer(i)
            if n % p != 0:
                raise ValueError(
                    f"--num-experts ({n}) must be divisible by --moe-expert-parallel-size ({p}) at MoE layer {i} "
                    f"(0-based); use an expert count that is a multiple of {p} or a smaller EP size there")
        if self.topk < 1 or self.topk > min(num_experts):
            raise ValueError(f"--topk ({self.topk}) must be between 1 and the smallest --num-experts "
                             f"({min(num_experts)})")
        if not self.train_capacity_factor > 0:
            raise ValueError(f"--moe-train-capacity-factor ({self.train_capacity_factor}) must be > 0")
        if not self.eval_capacity_factor > 0:
            raise ValueError(f"--moe-eval-capacity-factor ({self.eval_capacity_factor}) must be > 0")
        if self.min_capacity < 0:
            raise ValueError(f"--moe-min-capacity ({self.min_capacity}) must be >= 0")
        if self.noisy_gate_policy == "None":  # DeepSpeed accepts the string 'None' for no noise
            object.__setattr__(self, "noisy_gate_policy", None)
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(f"--moe-noisy-gate-policy ({self.noisy_gate_policy!r}) must be one of "
                             f"'Jitter', 'RSample' or None")
        if self.drop_policy is None:
            object.__setattr__(self, "drop_policy", deepspeed_drop_policy(self.topk))
        if self.aux_loss_choices is None:
            object.__setattr__(self, "aux_loss_choices", "first" if self.topk <= 2 else "all")
        for flag, value, allowed in (("--moe-token-drop-policy", self.drop_policy, DROP_POLICIES),
                                     ("MoEConfig.renormalize", self.renormalize, RENORMALIZE),
                                     ("MoEConfig.rts_scope", self.rts_scope, RTS_SCOPES),
                                     ("MoEConfig.aux_loss_choices", self.aux_loss_choices, AUX_LOSS_CHOICES),
                                     ("MoEConfig.expert_activation", self.expert_activation, ACTIVATIONS + (None,))):
            if value not in allowed:
                raise ValueError(f"{flag} ({value!r}) must be one of {allowed}")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"--mlp-type ({self.mlp_type!r}) must be one of {MLP_TYPES}")
        if self.loss_coeff < 0:
            raise ValueError(f"--moe-loss-coeff ({self.loss_coeff}) must be >= 0")
        if self.z_loss_coeff < 0:
            raise ValueError(f"--moe-z-loss-coeff ({self.z_loss_coeff}) must be >= 0")

    @classmethod
    def from_recorded(cls, recorded: dict, **overrides) -> "MoEConfig":
        """The config a checkpoint recorded (dataclasses.asdict, lists where JSON made them), with `overrides`
        applied; fields this version does not know are ignored (older/newer checkpoints still load). A checkpoint
        recorded before the routing choices existed gets LEGACY_ROUTING, the behaviour it was trained with."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in known}
        if "drop_policy" not in recorded:
            fields.update({k: v for k, v in LEGACY_ROUTING.items() if k not in recorded})
        fields.update(overrides)
        return cls(**fields)

    def num_experts_for_layer(self, moe_layer_index: int) -> int:
        """Experts in the `moe_layer_index`-th MoE layer (0-based); a single value applies to all layers."""
        if len(self.num_experts) == 1:
            return self.num_experts[0]
        return self.num_experts[moe_layer_index]

    def ep_size_for_layer(self, moe_layer_index: int) -> int:
        """Expert-parallel size of the `moe_layer_index`-th MoE layer (0-based); a single value applies to all."""
        if len(self.ep_size) == 1:
            return self.ep_size[0]
        return self.ep_size[moe_layer_index]


def _as_tuple(value) -> tuple:
    """An int, or a list/tuple of them (e.g. read back from a checkpoint's JSON-like config), as a tuple."""
    return (value,) if isinstance(value, int) else tuple(value)
