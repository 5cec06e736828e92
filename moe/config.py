"""`MoEConfig`: the frozen settings of every MoE layer, checked once before any module is built."""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
MLP_TYPES = ("standard", "residual")
DROP_POLICIES = ("position", "probs", "any")
ROUTER_INPUT_CENTERING = (False, "batch", "causal")  # --moe-router-center-input (docs/routing_health.md)
RENORMALIZE = ("after_drop", "before_drop")
RTS_SCOPES = ("top1", "train")
AUX_LOSS_CHOICES = ("first", "all")
ACTIVATIONS = ("gelu_tanh", "gelu", "swiglu")
ROUTER_FAMILIES = ("deepspeed", "megatron")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
BIAS_UPDATE_TYPES = ("sign", "proportional")
ROUTER_DTYPES = ("fp32", "fp64")

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
    drop_tokens: Optional[bool] = None  # False = dropless: every routed token is computed, no capacity; None = the
    #   router family's default (DeepSpeed: True; megatron-core: dropless unless a capacity factor is given)
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
    expert_activation: Optional[str] = None  # built-in experts' activation: 'gelu_tanh', 'gelu' (exact erf) or
    #   'swiglu'; None = the dense MLP's (ModelConfig.activation; 'gelu_tanh' in moe.MoE)
    # --- layer placement and expert sizes (Megatron-LM core's flags) ---
    layer_freq: Union[None, int, Tuple[int, ...]] = None  # --moe-layer-freq: N = layers 0, N, 2N.. are MoE, or a
    #   0/1 per layer; None = DeepSpeed's --expert-interval rule (layer i is MoE iff (i + 1) % interval == 0)
    moe_ffn_hidden_size: Optional[int] = None  # --moe-ffn-hidden-size: each routed expert's F; None = the dense MLP's
    shared_expert_ffn_hidden_size: Optional[int] = None  # --moe-shared-expert-intermediate-size: width of the
    #   shared expert(s) computed for every token beside the routed ones; None = no shared expert
    shared_expert_gate: bool = False  # scale the shared expert's output by sigmoid(x · w_gate) (Qwen2-MoE)
    # --- router (docs/design.md "Routers"); the --moe-router-* flags select router_family 'megatron' ---
    router_family: str = "deepspeed"  # 'deepspeed': DeepSpeed TopKGate's routing (the choices above); 'megatron':
    #   megatron-core TopKRouter's (the fields below; capacity ceil(k*T/E*cf) without min_capacity, no RTS)
    router_dtype: str = "fp32"  # 'fp32' or 'fp64': logits, scores, top-k and losses, with autocast off (both families)
    router_input_centering: Union[bool, str] = False  # both families, --moe-router-center-input: the router sees x
    #   minus a token mean. 'causal': minus the mean of the earlier tokens of its sequence, then RMS 1 per token (no
    #   state); 'batch' (True): minus the micro-batch's mean in training (detached; later positions included), a
    #   moving average of those in evaluation; False: x itself
    score_function: str = "softmax"  # megatron: 'softmax' or 'sigmoid' (DeepSeek-V3) scores of the logits
    pre_softmax: bool = False  # megatron softmax: top-k over softmax(logits) (True) or over the logits, then softmax
    #   over the chosen k (False; needs k >= 2)
    topk_scaling_factor: Optional[float] = None  # megatron: combine weights multiplied by this (None = 1)
    num_groups: Optional[int] = None  # megatron group-limited routing: experts split into this many equal groups
    group_topk: Optional[int] = None  # ... of which each token may use the best this many (None = no limit)
    expert_bias: bool = False  # megatron sigmoid: aux-loss-free balancing; a per-expert bias added for the choice
    bias_update_rate: float = 1e-3  # expert bias += rate * sign(mean load - load) once per optimizer step
    router_input_whitening: Optional[float] = None  # issue 28, --moe-router-input-whitening-momentum: with causal
    #   centring, the router input times Sigma^-1/2 (Sigma: moving average of the centred inputs' covariance)
    router_input_whitening_refresh: bool = False  # issue 28, --moe-router-input-whitening-refresh: after each
    #   optimizer step, Sigma folds in the step's last micro-batch again at the new parameters (no gradient)
    bias_update_type: str = "sign"  # issue 28: 'sign' (megatron-core) or 'proportional': += rate * (mean - load)/mean
    load_balancing_type: str = "aux_loss"  # megatron: 'aux_loss' (micro-batch), 'seq_aux_loss' (per sequence),
    #   'global_aux_loss' (global batch) or 'none'
    input_jitter_eps: Optional[float] = None  # megatron: router input times U(1-eps, 1+eps) in training
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
            flag = "--moe-router-topk" if self.router_family == "megatron" else "--topk"
            raise ValueError(f"{flag} ({self.topk}) must be between 1 and the smallest --num-experts "
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
            object.__setattr__(self, "drop_policy", "probs" if self.router_family == "megatron"
                               else deepspeed_drop_policy(self.topk))
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
        self._check_router()
        self._check_layers_and_sizes()

    def _check_router(self):
        if self.drop_tokens is None:
            object.__setattr__(self, "drop_tokens", self.router_family != "megatron")
        """The router fields: allowed values, then combinations that cannot route (one line each, flag names)."""
        for flag, value, allowed in (("MoEConfig.router_family", self.router_family, ROUTER_FAMILIES),
                                     ("--moe-router-dtype", self.router_dtype, ROUTER_DTYPES),
                                     ("--moe-router-score-function", self.score_function, SCORE_FUNCTIONS),
                                     ("--moe-router-load-balancing-type", self.load_balancing_type,
                                      LOAD_BALANCING_TYPES),
                                     ("--moe-router-bias-update-type", self.bias_update_type, BIAS_UPDATE_TYPES)):
            if value not in allowed:
                raise ValueError(f"{flag} ({value!r}) must be one of {allowed}")
        if self.router_input_centering is True:
            object.__setattr__(self, "router_input_centering", "batch")
        if self.router_input_centering not in ROUTER_INPUT_CENTERING:
            raise ValueError(f"--moe-router-center-input ({self.router_input_centering!r}) must be one of "
                             f"{ROUTER_INPUT_CENTERING}")
        m = self.router_input_whitening
        if m is not None and (self.router_input_centering != "causal" or not 0 <= m < 1):
            raise ValueError(f"--moe-router-input-whitening-momentum ({m}) must be in [0, 1) and needs "
                             f"--moe-router-center-input causal (got {self.router_input_centering!r})")
        if self.router_input_whitening_refresh and m is None:
            raise ValueError("--moe-router-input-whitening-refresh needs --moe-router-input-whitening-momentum "
                             "(it refreshes that moving covariance)")
        k, experts = self.topk, min(self.num_experts)
        if self.router_family == "deepspeed":
            used = [flag for flag, on in (
                ("--moe-router-score-function sigmoid", self.score_function != "softmax"),
                ("--moe-router-num-groups", self.num_groups is not None),
                ("--moe-router-group-topk", self.group_topk is not None),
                ("--moe-router-enable-expert-bias", self.expert_bias),
                ("--moe-router-load-balancing-type", self.load_balancing_type != "aux_loss"),
                ("--moe-router-bias-update-type", self.bias_update_type != "sign"),
                ("--moe-router-topk-scaling-factor", self.topk_scaling_factor is not None),
                ("--moe-input-jitter-eps", self.input_jitter_eps is not None)) if on]
            if used:
                raise ValueError(f"{used[0]} is a megatron-core router option: set router_family='megatron' "
                                 f"(the --moe-router-* flags do)")
            return
        if self.noisy_gate_policy is not None:
            raise ValueError(f"--moe-noisy-gate-policy ({self.noisy_gate_policy}) is DeepSpeed routing; with the "
                             f"--moe-router-* flags use --moe-input-jitter-eps")
        if self.drop_policy not in ("probs", "position"):
            raise ValueError(f"--moe-token-drop-policy ({self.drop_policy!r}) must be 'probs' or 'position' with "
                             f"the --moe-router-* flags")
        if self.score_function == "softmax" and k == 1 and not self.pre_softmax:
            raise ValueError("--moe-router-topk 1 with --moe-router-score-function softmax needs "
                             "--moe-router-pre-softmax (a softmax over one logit is 1 and has no gradient)")
        if self.group_topk is not None or self.num_groups is not None:
            groups, gk = self.num_groups, self.group_topk
            if groups is None or gk is None:
                raise ValueError(f"--moe-router-num-groups ({groups}) and --moe-router-group-topk ({gk}) go "
                                 f"together: give both or neither")
            if groups < 1 or any(n % groups for n in self.num_experts):
                raise ValueError(f"--moe-router-num-groups ({groups}) must divide --num-experts "
                                 f"({list(self.num_experts)})")
            if not 1 <= gk <= groups:
                raise ValueError(f"--moe-router-group-topk ({gk}) must be between 1 and --moe-router-num-groups "
                                 f"({groups})")
            if k % gk or k // gk > experts // groups:
                raise ValueError(f"--moe-router-topk ({k}) must be a multiple of --moe-router-group-topk ({gk}) "
                                 f"and at most {experts // groups} per group (--num-experts {experts} / "
                                 f"--moe-router-num-groups {groups})")
        if self.expert_bias and self.score_function != "sigmoid":
            raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                             "(megatron-core adds the bias to sigmoid scores only)")
        if not self.bias_update_rate >= 0:
            raise ValueError(f"--moe-router-bias-update-rate ({self.bias_update_rate}) must be >= 0")
        if self.input_jitter_eps is not None and not 0 < self.input_jitter_eps < 1:
            raise ValueError(f"--moe-input-jitter-eps ({self.input_jitter_eps}) must be in (0, 1)")
        if self.topk_scaling_factor is not None and not self.topk_scaling_factor > 0:
            raise ValueError(f"--moe-router-topk-scaling-factor ({self.topk_scaling_factor}) must be > 0")
        if self.pad_to_capacity and not self.drop_tokens:
            raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")

    def _check_layers_and_sizes(self) -> None:
        freq = self.layer_freq
        if isinstance(freq, list):
            freq = tuple(freq)
            object.__setattr__(self, "layer_freq", freq)
        if isinstance(freq, int) and freq < 1:
            raise ValueError(f"--moe-layer-freq ({freq}) must be >= 1")
        if isinstance(freq, tuple) and (any(v not in (0, 1) for v in freq) or 1 not in freq):
            raise ValueError(f"--moe-layer-freq ({list(freq)}) must be a list of 0 (dense) and 1 (MoE) per layer "
                             f"with at least one 1")
        for flag, v in (("--moe-ffn-hidden-size", self.moe_ffn_hidden_size),
                        ("--moe-shared-expert-intermediate-size", self.shared_expert_ffn_hidden_size)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} ({v}) must be >= 1")
        if self.shared_expert_gate and self.shared_expert_ffn_hidden_size is None:
            raise ValueError("--moe-shared-expert-gate gates the shared expert; it needs "
                             "--moe-shared-expert-intermediate-size")

    def is_moe_pattern(self, num_layers: int) -> Tuple[bool, ...]:
        """Whether each of the model's `num_layers` layers is a MoE layer (see layer_freq)."""
        freq = self.layer_freq
        if freq is None:
            return tuple((i + 1) % self.expert_interval == 0 for i in range(num_layers))
        if isinstance(freq, int):
            return tuple(i % freq == 0 for i in range(num_layers))
        if len(freq) != num_layers:
            raise ValueError(f"--moe-layer-freq lists {len(freq)} layers but --num-layers is {num_layers}; give "
                             f"one 0/1 per layer")
        return tuple(bool(v) for v in freq)

    def layer_plan(self, num_layers: int) -> Tuple[Optional["MoELayerSpec"], ...]:
        """Per transformer layer: None (dense MLP) or its MoELayerSpec; the one place MoE placement is computed.

        Raises ValueError when no layer is MoE or a per-layer list (--num-experts, --moe-expert-parallel-size)
        has neither one value nor one per MoE layer."""
        pattern = self.is_moe_pattern(num_layers)
        n_moe = sum(pattern)
        if n_moe == 0:
            raise ValueError(f"--num-experts {list(self.num_experts)} needs at least one MoE layer, but --num-layers "
                             f"({num_layers}) with {self._placement_flags()} gives none")
        for flag, values in (("--num-experts", self.num_experts), ("--moe-expert-parallel-size", self.ep_size)):
            if len(values) not in (1, n_moe):
                raise ValueError(f"{flag} has {len(values)} values; give one, or one per MoE layer ({n_moe} with "
                                 f"--num-layers {num_layers} and {self._placement_flags()})")
        plan, m = [], 0
        for is_moe in pattern:
            plan.append(MoELayerSpec(m, self.num_experts_for_layer(m), self.ep_size_for_layer(m)) if is_moe else None)
            m += bool(is_moe)
        return tuple(plan)

    def _placement_flags(self) -> str:
        if self.layer_freq is None:
            return f"--expert-interval {self.expert_interval}"
        freq = self.layer_freq
        return f"--moe-layer-freq {freq if isinstance(freq, int) else list(freq)}"

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


class MoELayerSpec(NamedTuple):
    """One MoE layer of a model (MoEConfig.layer_plan)."""
    moe_index: int  # position among the model's MoE layers (indexes per-layer lists; names expert files)
    num_experts: int  # E of this layer
    ep_size: int  # expert-parallel size of this layer


def parse_layer_freq(text: str) -> Union[int, Tuple[int, ...]]:
    """--moe-layer-freq as Megatron-LM reads it: an int, or a Python list expression of 0/1 such as
    `([0]*3+[1]*5)` or `[1,0,1]` (evaluated over int/list literals, `*` and `+` only; nothing else runs)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
            a, b = ev(node.left), ev(node.right)
            return a * b if isinstance(node.op, ast.Mult) else a + b
        raise ValueError
    try:
        value = ev(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        value = None
    if not isinstance(value, list):
        raise ValueError(f"--moe-layer-freq ({text!r}) must be an int or a list expression such as "
                         f"'([0]*3+[1]*5)' (0 = dense layer, 1 = MoE layer)")
    return tuple(value)


def _as_tuple(value) -> tuple:
    """An int, or a list/tuple of them (e.g. read back from a checkpoint's JSON-like config), as a tuple."""
    return (value,) if isinstance(value, int) else tuple(value)
