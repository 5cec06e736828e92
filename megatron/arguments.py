"""The only argparse code: Megatron-DeepSpeed flag definitions and their mapping onto TrainConfig fields.

The one validation pass: each config dataclass checks its own concern in `__post_init__` as it is built here, and
`validate` checks what spans several. Every problem is a ConfigError naming the flag (moe's dataclasses, which may
not import megatron, raise ValueError; `_checked` turns those into ConfigError at the point of mapping).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Optional, Sequence, Tuple

from megatron import parallel_state
from megatron.config import (LR_DECAY_STYLES, CheckpointConfig, CurriculumConfig, DataConfig, LoggingConfig, ModelConfig,
                             OptimizerConfig, ParallelConfig, SchedulerConfig, TokenizerConfig, TrainConfig)
from megatron.arguments_mcore import (add_megatron_core_block_args, core_block_fields, core_block_notes,
                                      core_moe_fields, validate_core_blocks)
from megatron.errors import ConfigError, UserError
from megatron.microbatches import rampup_batch_sizes, train_iters_from_samples
from moe.distill import DistillConfig, validate_distill


def _checked(build, *args, **kwargs):
    """build(*args, **kwargs), with a ValueError from a `moe` config check (whose messages name the flag) raised
    as the ConfigError it is. Only for building config objects: their checks are the only ValueErrors there."""
    try:
        return build(*args, **kwargs)
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _none_or_str(v: str) -> Optional[str]:
    return None if v in ("None", "none", "") else v


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden size")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"], default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                   help="MLP and expert activation: exact (erf) GELU instead of the fused bias-GeLU's tanh "
                        "approximation (as Megatron without the fusion)")
    g.add_argument("--openai-gelu", action="store_true",
                   help="tanh-approximate GELU even with --no-bias-gelu-fusion (Megatron's openai_gelu)")


def add_moe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, nargs="+", default=[1],
                   help="experts per MoE layer: one value for all, or one per MoE layer (pyramid); 1 = dense")
    g.add_argument("--expert-interval", type=int, default=2, help="MoE replaces the MLP every N-th layer")
    g.add_argument("--topk", type=int, default=1)
    g.add_argument("--moe-expert-parallel-size", type=int, nargs="+", default=[1])
    g.add_argument("--moe-train-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-eval-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-min-capacity", type=int, default=4)
    g.add_argument("--moe-loss-coeff", type=float, default=0.01)
    g.add_argument("--disable-moe-token-dropping", action="store_true")
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-noisy-gate-policy", type=_none_or_str, default=None, choices=[None, "Jitter", "RSample"])
    g.add_argument("--moe-use-rts", dest="moe_use_rts", action="store_true", default=True)
    g.add_argument("--no-moe-use-rts", dest="moe_use_rts", action="store_false")
    g.add_argument("--moe-token-drop-policy", choices=["position", "probs", "any"], default=None,
                   help="which routed tokens an over-full expert keeps; default: DeepSpeed's for --topk (any for "
                        "1, position for 2, probs above)")
    g.add_argument("--disable-moe-top2-2nd-expert-sampling", dest="moe_top2_2nd_expert_sampling",
                   action="store_false", help="top-2: take the 2nd expert by argmax instead of Gumbel sampling")
    g.add_argument("--mlp-type", choices=["standard", "residual"], default="standard")


def add_moe_router_args(p: argparse.ArgumentParser) -> None:
    """megatron-core's router flags (Megatron-LM spellings and meanings). Any of them but --moe-router-dtype selects
    MoEConfig.router_family 'megatron'; the DeepSpeed flags above keep DeepSpeed's routing (router_fields)."""
    g = p.add_argument_group("mixture of experts: megatron-core router")
    g.add_argument("--moe-router-topk", type=int, default=None, help="experts per token (same as --topk)")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default=None)
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="top-k over softmax(logits) instead of softmax over the top-k logits")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    g.add_argument("--moe-router-num-groups", type=int, default=None, help="group-limited routing: expert groups")
    g.add_argument("--moe-router-group-topk", type=int, default=None, help="groups each token may use")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing (DeepSeek-V3): a per-expert bias for the choice, updated each step")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=None, help="default 1e-3")
    g.add_argument("--moe-router-input-whitening-momentum", type=float, default=None,  # issue 28
                   help="off by default; with --moe-router-center-input causal: the router input times Sigma^-1/2, "
                        "Sigma the moving average (this weight on its past, per training micro-batch, per rank) of "
                        "the causally centred inputs' covariance (docs/routing_health.md; the demo uses 0.3)")
    g.add_argument("--moe-router-input-whitening-refresh", action="store_true",  # issue 28
                   help="with --moe-router-input-whitening-momentum: after each optimizer step, one more forward "
                        "(no gradient) of the step's last micro-batch at the new parameters folds its covariance "
                        "in, so the next step routes with a whitening of the current parameters; about one "
                        "micro-batch forward per step (docs/routing_health.md)")
    g.add_argument("--moe-router-bias-update-type", choices=["sign", "proportional"], default=None,  # issue 28
                   help="expert-bias step: rate * sign(mean load - load) (default, megatron-core) or 'proportional': "
                        "rate * (mean load - load) / mean load (docs/routing_health.md)")
    g.add_argument("--moe-router-load-balancing-type", default=None,
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"], help="default aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="load-balancing loss weight (same as --moe-loss-coeff; default 0 with these flags)")
    g.add_argument("--moe-input-jitter-eps", type=float, default=None)
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default="fp32",
                   help="router GEMM, scores, top-k and losses in this dtype with autocast off (both routers)")
    g.add_argument("--moe-router-center-input", nargs="?", const="batch", default=False,  # issue 28
                   choices=["causal", "batch"],
                   help="off by default (docs/routing_health.md): route x minus a token mean. 'causal': minus the "
                        "mean of the earlier tokens of the same sequence, scaled to RMS 1 per token (the same in "
                        "training, evaluation and generation; the demo's recipe). 'batch' (the bare flag, "
                        "experimental): the micro-batch's mean in training, so a token's choice depends on later "
                        "positions and other sequences; its moving average in evaluation")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="capacity ceil(k*T/E*cf) per expert; without it the router is dropless")


# DeepSpeed routing flag -> (its default, the megatron-core flag that replaces it). With the megatron-core router a
# DeepSpeed flag set away from its default conflicts unless it is the same setting (--topk, --moe-loss-coeff).
_DEEPSPEED_ROUTER_FLAGS = {
    "topk": (1, "--moe-router-topk"),
    "moe_loss_coeff": (0.01, "--moe-aux-loss-coeff"),
    "moe_train_capacity_factor": (1.0, "--moe-expert-capacity-factor"),
    "moe_eval_capacity_factor": (1.0, "--moe-expert-capacity-factor"),
    "moe_min_capacity": (4, "--moe-expert-capacity-factor"),
    "moe_noisy_gate_policy": (None, "--moe-input-jitter-eps"),
}
_MEGATRON_ROUTER_DESTS = ("moe_router_topk", "moe_router_score_function", "moe_router_topk_scaling_factor",
                          "moe_router_num_groups", "moe_router_group_topk", "moe_router_bias_update_rate",
                          "moe_router_bias_update_type", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
                          "moe_input_jitter_eps", "moe_expert_capacity_factor")


def router_fields(args) -> dict:
    """The MoEConfig router fields, and for the megatron-core router the fields it defines differently (topk, aux
    coefficient, capacity: ceil(k*T/E*cf) without a minimum, dropless without a capacity factor)."""
    megatron = (any(getattr(args, d) is not None for d in _MEGATRON_ROUTER_DESTS) or args.moe_router_pre_softmax
                or args.moe_router_enable_expert_bias)
    fields = dict(router_dtype=args.moe_router_dtype, router_input_centering=args.moe_router_center_input,
                  router_input_whitening=args.moe_router_input_whitening_momentum,
                  router_input_whitening_refresh=args.moe_router_input_whitening_refresh)
    if not megatron:
        return fields
    for dest, (default, flag) in _DEEPSPEED_ROUTER_FLAGS.items():
        value, theirs = getattr(args, dest), getattr(args, flag[2:].replace("-", "_"))
        synonym = dest in ("topk", "moe_loss_coeff")
        if value != default and (not synonym or (theirs is not None and theirs != value)):
            raise ConfigError(f"--{dest.replace('_', '-')} ({value}) conflicts with {flag} ({theirs}): give one "
                              f"(the --moe-router-* flags select megatron-core routing, which {flag} configures)")
    cf = args.moe_expert_capacity_factor
    if args.disable_moe_token_dropping and cf is not None:
        raise ConfigError(f"--disable-moe-token-dropping conflicts with --moe-expert-capacity-factor ({cf}): "
                          f"give one (without a capacity factor the megatron-core router is dropless)")
    coeff = args.moe_aux_loss_coeff
    fields.update(
        router_family="megatron",
        topk=args.moe_router_topk if args.moe_router_topk is not None else args.topk,
        loss_coeff=coeff if coeff is not None else (args.moe_loss_coeff if args.moe_loss_coeff != 0.01 else 0.0),
        drop_tokens=cf is not None and cf > 0,  # megatron-core: a negative factor means dropless
        train_capacity_factor=cf if cf is not None and cf > 0 else 1.0,
        eval_capacity_factor=cf if cf is not None and cf > 0 else 1.0,
        min_capacity=0,
        noisy_gate_policy=None,
        score_function=args.moe_router_score_function or "softmax",
        pre_softmax=args.moe_router_pre_softmax,
        topk_scaling_factor=args.moe_router_topk_scaling_factor,
        num_groups=args.moe_router_num_groups,
        group_topk=args.moe_router_group_topk,
        expert_bias=args.moe_router_enable_expert_bias,
        bias_update_rate=(args.moe_router_bias_update_rate if args.moe_router_bias_update_rate is not None
                          else 1e-3),
        bias_update_type=args.moe_router_bias_update_type or "sign",
        load_balancing_type=args.moe_router_load_balancing_type or "aux_loss",
        input_jitter_eps=args.moe_input_jitter_eps,
    )
    return fields


def add_moe_dispatch_args(p: argparse.ArgumentParser) -> None:
    """MoE dispatch flags (issue 23: host syncs), Megatron-LM's spelling plus its negation (default: automatic)."""
    g = p.add_argument_group("mixture of experts: dispatch")
    g.add_argument("--moe-pad-expert-input-to-capacity", dest="moe_pad_expert_input_to_capacity",
                   action="store_true", default=None,
                   help="capacity mode: every expert computes exactly C rows (no host sync per MoE layer); "
                        "default: on for CUDA")
    g.add_argument("--no-moe-pad-expert-input-to-capacity", dest="moe_pad_expert_input_to_capacity",
                   action="store_false", help="capacity mode: compute only the kept rows (one host sync per layer)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=list(LR_DECAY_STYLES), default="linear",
                   help="Megatron's warmup + constant/linear/cosine decay, or DeepSpeed's LRRangeTest (lr-range-test) "
                        "and OneCycle (one-cycle), configured by the flags below")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-tokens", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_true",
                   default=True, help="(default) bf16/fp32: a NaN/Inf loss or gradient stops training before the "
                                      "optimizer step, naming the iteration, rank and MoE layer")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="let non-finite steps through (Megatron-LM's spelling)")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale; default dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--distributed-backend", choices=["auto", "nccl", "gloo"], default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; CPU C++ backend)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--checkpoint-activations", action="store_true", help="Megatron-DeepSpeed spelling of --recompute-granularity full --recompute-method uniform")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=0, help="ZeRO: 1 shards optimizer state over data-parallel ranks, 2 also gradients")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="Megatron-LM's name for --zero-stage 1")
    _add_grad_reduce_args(p)
    _add_sequence_context_parallel_args(p)
    _add_expert_tensor_parallel_args(p)
    _add_pipeline_args(p)


# ---------------------------------------------------------------- expert tensor parallelism (issue 27)
def _add_expert_tensor_parallel_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's --expert-tensor-parallel-size and Megatron-DeepSpeed's --enable-expert-tensor-parallelism
    (ETP = the TP size): ParallelConfig.expert_tensor_parallel_size."""
    g = p.add_argument_group("expert tensor parallelism")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="ranks splitting each expert's FFN (column-parallel fc1, row-parallel fc2); > 1 lays the "
                        "experts out on their own ETP x EP x expert-DP grid over each stage's TP x CP x DP ranks "
                        "(default 1: experts replicated over TP)")
    g.add_argument("--enable-expert-tensor-parallelism", action="store_true",
                   help="Megatron-DeepSpeed's spelling: --expert-tensor-parallel-size = --tensor-model-parallel-size")


def expert_tensor_parallel_size(args) -> int:
    """--expert-tensor-parallel-size, or the TP size under --enable-expert-tensor-parallelism (both: must agree)."""
    etp, tp = args.expert_tensor_parallel_size, args.tensor_model_parallel_size
    if args.enable_expert_tensor_parallelism:
        if etp is not None and etp != tp:
            raise ConfigError(f"--enable-expert-tensor-parallelism sets the expert TP size to "
                              f"--tensor-model-parallel-size ({tp}), but --expert-tensor-parallel-size is {etp}; "
                              f"give one of them")
        return tp
    return 1 if etp is None else etp


def validate_expert_tensor_parallel(cfg: TrainConfig) -> None:
    """What --expert-tensor-parallel-size > 1 needs, each refused in one line (degrees: parallel_state)."""
    etp = cfg.parallel.expert_tensor_parallel_size
    if etp == 1:
        return
    if cfg.moe is None:
        raise ConfigError(f"--expert-tensor-parallel-size ({etp}) splits experts, but the model is dense "
                          f"(--num-experts 1); add experts or use 1")
    m = cfg.model
    ffn = cfg.moe.moe_ffn_hidden_size if cfg.moe.moe_ffn_hidden_size is not None else m.ffn_hidden_size
    for value, flag in ((ffn, "--moe-ffn-hidden-size (or --ffn-hidden-size)"), (m.hidden_size, "--hidden-size")):
        if value % etp:
            raise ConfigError(f"{flag} ({value}) must be divisible by --expert-tensor-parallel-size ({etp})")
    if cfg.optimizer_offload.enabled:
        raise ConfigError(f"--moe-offload-optimizer nvme with --expert-tensor-parallel-size ({etp}) is not "
                          f"supported (offload records hold whole experts); use one of them")


# ---------------------------------------------------------------- pipeline parallelism (issue 27)
def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's pipeline flags (megatron/pipeline): ParallelConfig fields."""
    g = p.add_argument_group("pipeline parallelism")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="stages the layers are split over (torch.distributed.pipelining schedules)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per model chunk: each rank holds several chunks, run by interleaved 1F1B")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers of the first stage (the other stages split the rest evenly)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers of the last stage (the other stages split the rest evenly)")
    g.add_argument("--pipeline-schedule", choices=["1f1b", "gpipe"], default="1f1b",
                   help="schedule without virtual stages (with them: interleaved 1F1B)")


def pipeline_fields(args) -> dict:
    return dict(pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
                first_stage_layers=args.decoder_first_pipeline_num_layers,
                last_stage_layers=args.decoder_last_pipeline_num_layers, pipeline_schedule=args.pipeline_schedule)


def validate_pipeline(cfg: TrainConfig, dp_size: int) -> None:
    """The layer split and the combinations pipeline parallelism needs, each refused in one line naming why."""
    par = cfg.parallel
    pp = par.pipeline_model_parallel_size
    chunked = par.layers_per_virtual_stage is not None or par.first_stage_layers is not None \
        or par.last_stage_layers is not None
    if pp == 1 and not chunked:
        return
    from megatron.pipeline.layout import stage_layers  # (megatron/pipeline is below arguments: STYLE §2)

    stage_layers(cfg.model.num_layers, pp, par.layers_per_virtual_stage, par.first_stage_layers,
                 par.last_stage_layers)
    flag = f"--pipeline-model-parallel-size {pp}"
    refused = [(cfg.distill.enabled, "--mos/--kd", "the teacher's logits would have to reach the last stage; "
                "distil at --pipeline-model-parallel-size 1"),
               (cfg.optimizer.overlap_grad_reduce, "--overlap-grad-reduce", "the schedule runs every micro-batch's "
                "backward inside torch.distributed.pipelining, with no last-micro-batch hook; drop it"),
               (cfg.curriculum is not None, "the --deepspeed_config seqlen curriculum", "stages exchange "
                "activations of one fixed shape; drop curriculum_learning"),
               (cfg.compile, "--compile", "the stages run the model's chunks, not the compiled whole; drop it"),
               (cfg.optimizer_offload.enabled, "--moe-offload-optimizer", "the expert-state swapper is not built "
                "for pipeline stages (untested); offload at --pipeline-model-parallel-size 1"),
               (par.zero_stage == 2 and not cfg.model.untie_embeddings_and_output_weights, "--zero-stage 2 with "
                "tied embeddings", "the sharded grad norm would count the last stage's copy of the embedding twice; "
                "use --zero-stage 1 or --untie-embeddings-and-output-weights")]
    for bad, what, why in refused:
        if bad and pp > 1:
            raise ConfigError(f"{flag} with {what} is not supported: {why}")
    if par.layers_per_virtual_stage is not None:
        for gbs in rampup_batch_sizes(cfg.data):
            n = gbs // (cfg.data.micro_batch_size * dp_size)
            if n % max(1, n // pp) != 0:
                raise ConfigError(f"--num-layers-per-virtual-pipeline-stage with {flag}: {n} micro-batches per step "
                                  f"(--global-batch-size {gbs} / (--micro-batch-size {cfg.data.micro_batch_size} x "
                                  f"data-parallel {dp_size})) must be a multiple of max(1, {n} // {pp}) "
                                  f"(interleaved 1F1B's rounds); pick a multiple of {pp} micro-batches")


# ---------------------------------------------------------------- sequence and context parallelism (issue 27)
def _add_sequence_context_parallel_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's --sequence-parallel and --context-parallel-size: ParallelConfig fields."""
    g = p.add_argument_group("sequence and context parallelism")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with TP > 1: norms, dropout and MoE layers on sequence chunks; all-gather / reduce-scatter "
                        "around the TP linears in place of all-reduces (Megatron-LM)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="ranks splitting each sequence (attention over all-gathered keys/values, causal load "
                        "balancing: 2 x CP chunks, rank i holds chunks i and 2CP-1-i)")


def validate_sequence_context_parallel(cfg: TrainConfig) -> None:
    """The combinations --sequence-parallel and --context-parallel-size need, each refused in one line."""
    par, seq = cfg.parallel, cfg.data.seq_length
    tp, cp = par.tensor_model_parallel_size, par.context_parallel_size
    if par.sequence_parallel:
        if tp == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1 (got 1): it shards the "
                              "TP group's norm/dropout regions; raise TP or drop --sequence-parallel")
    if cp > 1 and cfg.distill.enabled:
        raise ConfigError(f"--context-parallel-size ({cp}) with --mos/--kd is not supported (the teacher's logits "
                          f"are not split by sequence); use --context-parallel-size 1 for distillation")
    sp_cp = " and ".join(f for f, on in (("--sequence-parallel", par.sequence_parallel),
                                         (f"--context-parallel-size {cp}", cp > 1)) if on)
    if sp_cp and cfg.optimizer.overlap_grad_reduce:
        raise ConfigError(f"{sp_cp} with --overlap-grad-reduce is not supported (their partial gradients are summed "
                          f"after the backward, the overlapped buckets during it); drop --overlap-grad-reduce")
    if sp_cp and cfg.curriculum is not None:
        raise ConfigError(f"{sp_cp} with the --deepspeed_config seqlen curriculum is not supported (the truncated "
                          f"lengths need not split into equal chunks); drop curriculum_learning")
    if sp_cp and cfg.moe is not None and cfg.moe.router_input_centering == "causal":  # issue 28
        raise ConfigError(f"{sp_cp} with --moe-router-center-input causal is not supported (a rank holds a chunk "
                          f"of each sequence, without the earlier chunks' tokens); drop one of them")
    if par.pipeline_model_parallel_size > 1 and cfg.moe is not None and cfg.moe.router_input_whitening_refresh:
        raise ConfigError("--moe-router-input-whitening-refresh with --pipeline-model-parallel-size "
                          f"{par.pipeline_model_parallel_size} is not supported (the refresh forward runs the whole "
                          "model on one rank); drop --moe-router-input-whitening-refresh")
    if par.sequence_parallel or cp > 1:
        chunks = (tp if par.sequence_parallel else 1) * (2 * cp if cp > 1 else 1)
        if seq % chunks != 0:
            raise ConfigError(f"--seq-length ({seq}) must be divisible by {chunks} = "
                              f"--tensor-model-parallel-size ({tp}) with --sequence-parallel "
                              f"({par.sequence_parallel}) x 2 x --context-parallel-size ({cp}); pick a multiple")


def _add_grad_reduce_args(p: argparse.ArgumentParser) -> None:
    """Gradient reduction overlapped with the backward (Megatron-LM's DDP flags): OptimizerConfig fields."""
    g = p.add_argument_group("gradient reduction")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="all-reduce (ZeRO-2: reduce-scatter) gradient buckets from gradient hooks while the last "
                        "micro-batch's backward still runs")
    g.add_argument("--ddp-bucket-size", type=int, default=40_000_000,
                   help="elements per gradient bucket under --overlap-grad-reduce (ZeRO-2 buckets are its shards)")


def add_batch_schedule_args(p: argparse.ArgumentParser) -> None:
    """Sample-based training, batch-size ramp-up and resuming the LR schedule (Megatron-LM semantics)."""
    g = p.add_argument_group("sample-based training and batch ramp-up")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train for this many samples (all ranks) instead of --train-iters")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="LR warmup in samples (with --train-samples)")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="LR decay horizon in samples (with --train-samples; default --train-samples)")
    g.add_argument("--rampup-batch-size", nargs="*", default=None, metavar="START INC SAMPLES",
                   help="global batch grows from START by INC over SAMPLES samples up to --global-batch-size "
                        "(needs --train-samples)")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, take max/min LR, warmup, decay length and style from the flags, not the checkpoint")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, take max/min LR, warmup, decay length and style from the checkpoint")


def add_deepspeed_args(p: argparse.ArgumentParser) -> None:
    """Megatron-DeepSpeed launcher flags: the DeepSpeed JSON config and flags that select DeepSpeed machinery."""
    g = p.add_argument_group("Megatron-DeepSpeed compatibility")
    g.add_argument("--deepspeed", action="store_true", help="read --deepspeed_config (there is no DeepSpeed engine: "
                                                            "the JSON is mapped onto these flags)")
    g.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON config (megatron/ds_config.py)")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="with --checkpoint-activations: DeepSpeed's checkpointing there, the same recompute here")
    g.add_argument("--create-moe-param-group", action="store_true",
                   help="expert parameters in their own optimizer groups (always the case here)")
    g.add_argument("--no-pipeline-parallel", action="store_true", help="no pipeline engine (always the case here)")
    g.add_argument("--data-impl", default="infer", help="mmap or infer: the indexed dataset is always mmap here")
    p.set_defaults(ds_gradient_accumulation_steps=None, wall_clock_breakdown=False, curriculum_learning=None,
                   config_notes=[])


def add_lr_schedule_args(p: argparse.ArgumentParser) -> None:
    """DeepSpeed's LRRangeTest / OneCycle parameters, hyphenated (DeepSpeed's own CLI spells them with
    underscores; this CLI keeps Megatron's hyphens so every flag reads alike). Defaults are DeepSpeed's."""
    g = p.add_argument_group("LR range test and OneCycle (--lr-decay-style lr-range-test / one-cycle)")
    g.add_argument("--lr-range-test-min-lr", type=float, default=1e-3, help="LR of the first step")
    g.add_argument("--lr-range-test-step-size", type=int, default=2000, help="steps per increase interval")
    g.add_argument("--lr-range-test-step-rate", type=float, default=1.0,
                   help="LR growth per interval in units of the min LR: lr = min * (1 + rate * steps / size)")
    g.add_argument("--lr-range-test-staircase", action="store_true", help="hold the LR flat within each interval")
    g.add_argument("--cycle-min-lr", type=float, default=None, help="one-cycle: LR at both ends of the cycle")
    g.add_argument("--cycle-max-lr", type=float, default=None, help="one-cycle: LR at the peak")
    g.add_argument("--cycle-first-step-size", type=int, default=2000, help="steps of the rising half")
    g.add_argument("--cycle-second-step-size", type=int, default=None, help="steps of the falling half "
                                                                            "(default: the first's)")
    g.add_argument("--cycle-first-stair-count", type=int, default=0, help="> 0: the rising half in flat stairs")
    g.add_argument("--cycle-second-stair-count", type=int, default=None,
                   help="stairs of the falling half (default: the first's)")
    g.add_argument("--decay-step-size", type=int, default=0, help="after the cycle: steps per decay interval "
                                                                  "(0: hold the min LR)")
    g.add_argument("--decay-lr-rate", type=float, default=0.0,
                   help="after the cycle: lr = cycle_min_lr / (1 + rate * steps / decay_step_size)")
    g.add_argument("--no-cycle-momentum", dest="cycle_momentum", action="store_false", default=True,
                   help="one-cycle: leave Adam's beta1 at --adam-beta1 instead of cycling it")
    g.add_argument("--cycle-min-mom", type=float, default=0.8, help="one-cycle: Adam beta1 at the LR peak")
    g.add_argument("--cycle-max-mom", type=float, default=0.9, help="one-cycle: Adam beta1 at the cycle's ends")
    g.add_argument("--decay-mom-rate", type=float, default=0.0,
                   help="after the cycle: beta1 = cycle_max_mom * (1 + rate * steps / decay_step_size)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None)
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--tokenizer-type", choices=["GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None)


def add_distill_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of students / knowledge distillation")
    g.add_argument("--mos", action="store_true", help="distil into a MoE student")
    g.add_argument("--kd", action="store_true", help="distil into a dense student")
    g.add_argument("--load-teacher", default=None, help="teacher checkpoint (root or iter_XXXXXXX)")
    g.add_argument("--num-layers-teacher", type=int, default=None)
    g.add_argument("--hidden-size-teacher", type=int, default=None)
    g.add_argument("--num-attention-heads-teacher", type=int, default=None)
    g.add_argument("--num-experts-teacher", type=int, nargs="+", default=None,
                   help="default: the teacher checkpoint's recorded expert counts")
    g.add_argument("--kd-temp", type=float, default=1.0)
    g.add_argument("--kd-alpha-ce", type=float, default=1.0, help="weight of the LM loss")
    g.add_argument("--kd-beta-ce", type=float, default=1.0, help="weight of the KD term")
    g.add_argument("--mos-kd-stop-iters", type=int, default=None, help="staged KD: teacher off from this step")
    g.add_argument("--mos-kd-stop-tokens", type=int, default=None, help="staged KD: teacher off after these tokens")


def add_checkpoint_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration and optimizer")
    g.add_argument("--reset-iteration", action="store_true",
                   help="load weights (and optimizer unless --no-load-optim) but restart iteration, counters and LR "
                        "schedule")
    g.add_argument("--load-fallback", action="store_true",
                   help="when the --load checkpoint (or its tracker) is torn or corrupted, load the newest older "
                        "iteration that verifies instead of stopping")
    g.add_argument("--async-save", action="store_true",
                   help="snapshot the state to CPU memory and write the checkpoint on a background thread while "
                        "training goes on (the tracker moves only once it is complete)")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once this many minutes of wall time have passed since start")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGINT, finish the current step, save, and exit 0 (Megatron-LM)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="TensorBoard events buffered before a write to disk")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write per-phase step times and the iteration time to TensorBoard")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true", help="write the global batch size")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="write validation perplexity next to the validation loss")
    g.add_argument("--log-optimizer-states-to-tensorboard", action="store_true",
                   help="write L1/L2 norms and abs max of Adam's moments and of the weights")
    g.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s per device for MFU (default: measure an fp32 GEMM at start)")


def add_optimizer_offload_args(p: argparse.ArgumentParser) -> None:
    """Expert Adam state on NVMe in training: moe.offload.OptimizerOffloadConfig (DeepSpeed's offload_optimizer and
    aio blocks map onto these dests: megatron.ds_config.offload_args_from_ds_config). Offloaded inference has
    its own flags next to its code (megatron/offload.py add_expert_offload_args)."""
    g = p.add_argument_group("expert optimizer offload")
    g.add_argument("--moe-offload-optimizer", choices=["none", "nvme"], default="none",
                   help="nvme: keep the expert parameters' Adam state in files, swapped through a few buffers")
    g.add_argument("--moe-offload-dir", default=None,
                   help="directory on the NVMe disk for the offloaded state (scratch: one store per rank)")
    g.add_argument("--moe-offload-buffer-count", type=int, default=4,
                   help="page-locked record buffers (read ahead / write behind); resident bytes = this x the "
                        "largest expert's state")
    g.add_argument("--no-moe-offload-pipeline", dest="moe_offload_pipeline", action="store_false", default=True,
                   help="read, update and write one expert at a time instead of overlapping them")
    g.add_argument("--moe-offload-overlap", action="store_true",
                   help="run the expert swap behind the next forward pass (which waits at each MoE layer for that "
                        "layer's experts) instead of inside the optimizer step; ignored with --compile")
    g.add_argument("--moe-offload-aio-block-size", type=int, default=1 << 20, help="bytes per aio request")
    g.add_argument("--moe-offload-aio-queue-depth", type=int, default=32, help="aio requests in flight per thread")
    g.add_argument("--moe-offload-aio-single-submit", action="store_true", help="one io_submit per request")
    g.add_argument("--moe-offload-aio-overlap-events", action="store_true", help="refill the queue per completion")
    g.add_argument("--moe-offload-aio-intra-op-parallelism", type=int, default=1,
                   help="threads per aio request")


def optimizer_offload_config_from_args(args):
    from moe.offload.config import OptimizerOffloadConfig

    return _checked(
        OptimizerOffloadConfig,
        mode=args.moe_offload_optimizer,
        directory=args.moe_offload_dir,
        buffer_count=args.moe_offload_buffer_count,
        pipeline=args.moe_offload_pipeline,
        overlap=args.moe_offload_overlap and not args.compile,  # a blocking forward hook would break the graph
        aio_block_size=args.moe_offload_aio_block_size,
        aio_queue_depth=args.moe_offload_aio_queue_depth,
        aio_single_submit=args.moe_offload_aio_single_submit,
        aio_overlap_events=args.moe_offload_aio_overlap_events,
        aio_intra_op_parallelism=args.moe_offload_aio_intra_op_parallelism,
    )


def add_device_args(p: argparse.ArgumentParser) -> None:
    """Device and process-group settings applied at start-up (megatron/device_settings.py)."""
    g = p.add_argument_group("device settings")
    g.add_argument("--no-tf32", dest="tf32", action="store_false", default=True,
                   help="fp32 matmuls and cuDNN convolutions on CUDA in IEEE fp32 instead of TF32 (TF32 is the "
                        "default, as Megatron-LM runs in NVIDIA's containers; no effect on the CPU)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="timeout of init_process_group and of every process group (Megatron-LM's flag; default 10, "
                        "NCCL's): how long a rank waits in a collective, start-up data barriers included")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Megatron-style GPT (MoE) pretraining", allow_abbrev=False)
    add_model_args(p)
    add_moe_args(p)
    add_moe_router_args(p)
    add_megatron_core_block_args(p)
    add_moe_dispatch_args(p)
    add_training_args(p)
    add_batch_schedule_args(p)
    add_lr_schedule_args(p)
    add_data_args(p)
    add_distill_args(p)
    add_checkpoint_logging_args(p)
    add_optimizer_offload_args(p)
    add_deepspeed_args(p)
    add_device_args(p)
    add_checkpoint_architecture_args(p)
    return p


def add_checkpoint_architecture_args(p: argparse.ArgumentParser) -> None:
    """Issue 26: continue training an imported model without repeating its architecture flags."""
    g = p.add_argument_group("architecture from the checkpoint")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model, MoE and tokenizer flags recorded in the --load checkpoint (a Hugging Face "
                        "import, or a model a Hugging Face family computes); flags given on the command line come "
                        "after them and win (an architecture that then differs from the checkpoint is refused "
                        "naming the flag)")


def _with_checkpoint_args(p: argparse.ArgumentParser, argv: list) -> list:
    """argv with the --load checkpoint's recorded architecture flags in front (--use-checkpoint-args)."""
    args = p.parse_args(argv)
    if not args.use_checkpoint_args:
        return argv
    if not args.load:
        raise ConfigError("--use-checkpoint-args reads the --load checkpoint's flags; give --load")
    from megatron.hf import checkpoint_training_flags

    return checkpoint_training_flags(args.load) + argv


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider=None) -> argparse.Namespace:
    """Parses the flags; with --deepspeed --deepspeed_config FILE the JSON then fills the dests it maps to
    (megatron/ds_config.py). `args.config_notes` holds the lines to log once (no-effect flags and keys)."""
    p = build_parser()
    if extra_args_provider is not None:
        extra_args_provider(p)
    argv = _with_checkpoint_args(p, list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(argv)
    args.config_notes = []
    if args.deepspeed_config is not None and not args.deepspeed:
        args.config_notes.append(f"--deepspeed_config {args.deepspeed_config} without --deepspeed: not read (as in "
                                 f"Megatron-DeepSpeed); add --deepspeed to use it")
    elif args.deepspeed_config is not None:
        from megatron import ds_config

        args.config_notes += ds_config.apply(args, args.deepspeed_config, _explicit_dests(p, argv))
    elif args.deepspeed:
        args.config_notes.append("--deepspeed without --deepspeed_config: nothing to read; the flags configure "
                                 "everything (there is no DeepSpeed engine here)")
    if args.tokenizer_type is None and args.vocab_file and args.merge_file and not args.tokenizer_model:
        # the Megatron-DeepSpeed MoE scripts pass --vocab-file/--merge-file only: that pair is GPT-2's BPE
        args.tokenizer_type = "GPT2BPETokenizer"
        args.config_notes.append("--tokenizer-type not given: GPT2BPETokenizer (from --vocab-file and --merge-file)")
    args.config_notes += _flag_notes(args) + core_block_notes(args)
    return args


def _explicit_dests(p: argparse.ArgumentParser, argv: Sequence[str]) -> dict:
    """{dest: the flag as typed} for every option given on the command line (allow_abbrev is off, so exact)."""
    out = {}
    for tok in argv:
        if tok.startswith("--"):
            action = p._option_string_actions.get(tok.split("=", 1)[0])
            if action is not None:
                out[action.dest] = tok.split("=", 1)[0]
    return out


def _flag_notes(args) -> list:
    """Megatron-DeepSpeed flags that are accepted but change nothing here: one log line each."""
    notes = []
    if args.data_impl == "mmap":
        notes.append("--data-impl mmap: the indexed dataset is always read through mmap here; nothing to change")
    if args.create_moe_param_group:
        notes.append("--create-moe-param-group: expert parameters always have their own optimizer groups here")
    if args.no_pipeline_parallel:
        notes.append("--no-pipeline-parallel: at --pipeline-model-parallel-size 1 there is no pipeline engine; "
                     "nothing to change")
    if args.deepspeed_activation_checkpointing:
        notes.append("--deepspeed-activation-checkpointing: recompute is torch.utils.checkpoint here, the same "
                     "recompute as --checkpoint-activations" + ("" if args.checkpoint_activations else
                                                               "; without --checkpoint-activations it does nothing"))
    return notes


def _require(args, *names: str) -> None:
    for n in names:
        if getattr(args, n.lstrip("-").replace("-", "_")) is None:
            raise ConfigError(f"{n} is required")


def model_config_from_args(args, padded_vocab_size: int) -> ModelConfig:
    _require(args, "--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length")
    recompute_granularity = args.recompute_granularity
    recompute_method = args.recompute_method
    recompute_num_layers = args.recompute_num_layers
    if args.checkpoint_activations:
        # Megatron-LM's meaning of the old flag: full recompute, uniform chunks of one layer (every layer's input
        # is kept, everything inside a layer is recomputed); explicit --recompute-* flags win where given
        recompute_granularity = recompute_granularity or "full"
        recompute_method = recompute_method or "uniform"
        recompute_num_layers = recompute_num_layers if recompute_num_layers is not None else 1
    return ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size if args.ffn_hidden_size is not None else 4 * args.hidden_size,
        seq_length=args.seq_length,
        max_position_embeddings=(args.max_position_embeddings if args.max_position_embeddings is not None
                                 else args.seq_length),
        padded_vocab_size=padded_vocab_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        rotary_base=args.rotary_base,
        layernorm_epsilon=args.layernorm_epsilon,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        **core_block_fields(args),  # activation, norm, attention kind, position embedding, biases, head
    )


def moe_config_from_args(args):
    """None for a dense model (--num-experts 1, the Megatron-DeepSpeed default)."""
    if list(args.num_experts) == [1]:
        return None
    from moe.config import MoEConfig

    cfg = _checked(MoEConfig, **dict(
        num_experts=tuple(args.num_experts),
        expert_interval=args.expert_interval,
        topk=args.topk,
        ep_size=tuple(args.moe_expert_parallel_size),
        train_capacity_factor=args.moe_train_capacity_factor,
        eval_capacity_factor=args.moe_eval_capacity_factor,
        min_capacity=args.moe_min_capacity,
        loss_coeff=args.moe_loss_coeff,
        drop_tokens=not args.disable_moe_token_dropping,
        z_loss_coeff=args.moe_z_loss_coeff,
        noisy_gate_policy=args.moe_noisy_gate_policy,
        use_rts=args.moe_use_rts,
        mlp_type=args.mlp_type,
        drop_policy=args.moe_token_drop_policy,  # None: DeepSpeed's policy for --topk
        second_expert_sampling=args.moe_top2_2nd_expert_sampling,
        pad_to_capacity=args.moe_pad_expert_input_to_capacity,  # None: automatic (CUDA)
    ) | router_fields(args) | core_moe_fields(args))  # router flags; layer placement, expert and shared sizes
    _require(args, "--num-layers")
    _checked(cfg.layer_plan, args.num_layers)  # at least one MoE layer; per-layer lists of the right length
    return cfg


def tokenizer_config_from_args(args) -> TokenizerConfig:
    return TokenizerConfig(
        tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )


def _rampup(values) -> Optional[tuple]:
    """--rampup-batch-size START INC SAMPLES -> (start, inc, samples) of ints."""
    if values is None:
        return None
    try:
        parsed = tuple(int(v) for v in values)
    except ValueError:
        parsed = ()
    if len(parsed) != 3:
        raise ConfigError(f"--rampup-batch-size {' '.join(values)}: expected three integers, START INC SAMPLES "
                            f"(e.g. --rampup-batch-size 32 32 1953125)")
    return parsed


def scheduler_config_from_args(args, data: DataConfig) -> SchedulerConfig:
    """Iteration- or sample-based training and LR schedule, with Megatron-LM's rules for mixing them.

    --train-tokens is Megatron-DeepSpeed's extra stop (whichever of it and the iteration count comes first); given
    alone it also sets the iteration count (tokens / (global batch x seq length), rounded up).
    """
    if args.data_impl not in ("mmap", "infer"):
        raise ConfigError(f"--data-impl {args.data_impl}: only mmap (or infer) datasets exist here; convert with "
                            f"tools/preprocess_data.py and pass --data-impl mmap")
    iter_flags = [f for f, v in (("--lr-decay-iters", args.lr_decay_iters), ("--lr-warmup-iters", args.lr_warmup_iters))
                  if v]
    sample_flags = [f for f, v in (("--lr-decay-samples", args.lr_decay_samples),
                                   ("--lr-warmup-samples", args.lr_warmup_samples),
                                   ("--rampup-batch-size", data.rampup_batch_size)) if v]
    train_iters = args.train_iters
    if args.train_samples is not None:
        if args.train_iters is not None:
            raise ConfigError("--train-iters and --train-samples are mutually exclusive; give one (Megatron)")
        if iter_flags:
            raise ConfigError(f"{iter_flags[0]} is iteration-based but --train-samples is sample-based; use the "
                                f"-samples form")
        train_iters = train_iters_from_samples(args.train_samples, data)
    elif sample_flags:
        raise ConfigError(f"{sample_flags[0]} needs sample-based training: give --train-samples instead of "
                            f"--train-iters/--train-tokens (Megatron)")
    elif train_iters is None and args.train_tokens is not None:
        train_iters = math.ceil(args.train_tokens / (data.global_batch_size * data.seq_length))
    if train_iters is None:
        raise ConfigError("one of --train-iters, --train-samples or --train-tokens is required")
    sample_based = args.train_samples is not None
    return SchedulerConfig(
        lr_decay_style=args.lr_decay_style, train_iters=train_iters, train_tokens=args.train_tokens,
        lr_warmup_iters=args.lr_warmup_iters,
        lr_decay_iters=None if sample_based else (args.lr_decay_iters if args.lr_decay_iters is not None
                                                  else train_iters),
        lr_warmup_tokens=args.lr_warmup_tokens, lr_decay_tokens=args.lr_decay_tokens,
        train_samples=args.train_samples, lr_warmup_samples=args.lr_warmup_samples,
        lr_decay_samples=args.lr_decay_samples,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        lr_range_test_min_lr=args.lr_range_test_min_lr,
        lr_range_test_step_size=args.lr_range_test_step_size,
        lr_range_test_step_rate=args.lr_range_test_step_rate,
        lr_range_test_staircase=args.lr_range_test_staircase,
        cycle_min_lr=args.cycle_min_lr,
        cycle_max_lr=args.cycle_max_lr,
        cycle_first_step_size=args.cycle_first_step_size,
        cycle_second_step_size=args.cycle_second_step_size,
        cycle_first_stair_count=args.cycle_first_stair_count,
        cycle_second_stair_count=args.cycle_second_stair_count,
        decay_step_size=args.decay_step_size,
        decay_lr_rate=args.decay_lr_rate,
        cycle_momentum=args.cycle_momentum,
        cycle_min_mom=args.cycle_min_mom,
        cycle_max_mom=args.cycle_max_mom,
        decay_mom_rate=args.decay_mom_rate,
    )


def train_config_from_args(args, padded_vocab_size: int, dp_size: int = 1) -> TrainConfig:
    """Maps every flag onto one dataclass field (tests/unit/test_arguments.py pins the mapping).

    dp_size only sets the default --global-batch-size (micro batch x data-parallel size); `validate` checks it.
    """
    model = model_config_from_args(args, padded_vocab_size)
    mbs = args.micro_batch_size
    gbs = args.global_batch_size if args.global_batch_size is not None else mbs * dp_size
    if args.ds_gradient_accumulation_steps is not None:  # ds_config gradient_accumulation_steps
        gas = args.ds_gradient_accumulation_steps
        if gbs != mbs * dp_size * gas:
            raise ConfigError(f"--deepspeed_config gradient_accumulation_steps ({gas}) x --micro-batch-size ({mbs}) "
                                f"x data-parallel size ({dp_size}) != the global batch size ({gbs}); make them agree")
    data = DataConfig(
        data_path=tuple(args.data_path or ()), split=args.split, seq_length=args.seq_length,
        micro_batch_size=mbs, global_batch_size=gbs, num_workers=args.num_workers, seed=args.seed,
        data_cache_path=args.data_cache_path, eod_mask_loss=args.eod_mask_loss,
        rampup_batch_size=_rampup(args.rampup_batch_size),
    )
    return TrainConfig(
        model=model,
        moe=moe_config_from_args(args),
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            distributed_backend=args.distributed_backend,
            zero_stage=max(args.zero_stage, 1) if args.use_distributed_optimizer else args.zero_stage,
            distributed_timeout_minutes=args.distributed_timeout_minutes,
            sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size(args),
            **pipeline_fields(args),
        ),
        optimizer=OptimizerConfig(
            lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
            fp16=args.fp16, bf16=args.bf16, loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
            loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis,
            overlap_grad_reduce=args.overlap_grad_reduce, ddp_bucket_size=args.ddp_bucket_size,
        ),
        scheduler=scheduler_config_from_args(args, data),
        data=data,
        tokenizer=tokenizer_config_from_args(args),
        checkpoint=CheckpointConfig(
            save=args.save, load=args.load, save_interval=args.save_interval, no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng, finetune=args.finetune, reset_iteration=args.reset_iteration,
            load_fallback=args.load_fallback, async_save=args.async_save,
        ),
        distill=_checked(
            DistillConfig, mos=args.mos, kd=args.kd, load_teacher=args.load_teacher,
            num_layers_teacher=args.num_layers_teacher, hidden_size_teacher=args.hidden_size_teacher,
            num_attention_heads_teacher=args.num_attention_heads_teacher,
            num_experts_teacher=tuple(args.num_experts_teacher) if args.num_experts_teacher else None,
            kd_temp=args.kd_temp, kd_alpha_ce=args.kd_alpha_ce, kd_beta_ce=args.kd_beta_ce,
            kd_stop_iters=args.mos_kd_stop_iters, kd_stop_tokens=args.mos_kd_stop_tokens,
        ),
        logging=LoggingConfig(
            log_interval=args.log_interval, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
            exit_interval=args.exit_interval, exit_duration_in_mins=args.exit_duration_in_mins,
            exit_signal_handler=args.exit_signal_handler, tensorboard_dir=args.tensorboard_dir, peak_flops=args.peak_flops,
            tensorboard_queue_size=args.tensorboard_queue_size,
            log_timers_to_tensorboard=args.log_timers_to_tensorboard,
            log_batch_size_to_tensorboard=args.log_batch_size_to_tensorboard,
            log_validation_ppl_to_tensorboard=args.log_validation_ppl_to_tensorboard,
            log_optimizer_states_to_tensorboard=args.log_optimizer_states_to_tensorboard,
            wall_clock_breakdown=args.wall_clock_breakdown,
        ),
        optimizer_offload=optimizer_offload_config_from_args(args),
        curriculum=CurriculumConfig(**args.curriculum_learning) if args.curriculum_learning else None,
        compile=args.compile,
        deterministic=args.deterministic,
        tf32=args.tf32,
    )


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Checks that span several concerns; runs before any group or module is built."""
    tp = cfg.parallel.tensor_model_parallel_size
    dp = parallel_state.validate_sizes(world_size, tp, cfg.moe.ep_size if cfg.moe is not None else (1,),
                                       cp_size=cfg.parallel.context_parallel_size,
                                       etp_size=cfg.parallel.expert_tensor_parallel_size,
                                       pp_size=cfg.parallel.pipeline_model_parallel_size)
    validate_sequence_context_parallel(cfg)
    validate_expert_tensor_parallel(cfg)
    validate_pipeline(cfg, dp)
    d = cfg.data
    if d.global_batch_size % (d.micro_batch_size * dp) != 0:
        raise ConfigError(f"--global-batch-size ({d.global_batch_size}) must be divisible by "
                          f"--micro-batch-size ({d.micro_batch_size}) x data-parallel size ({dp})")
    for b in rampup_batch_sizes(d):
        if b % (d.micro_batch_size * dp) != 0:
            raise ConfigError(f"--rampup-batch-size {' '.join(map(str, d.rampup_batch_size))}: the global batch "
                                f"{b} of the ramp-up is not divisible by --micro-batch-size ({d.micro_batch_size}) x "
                                f"data-parallel size ({dp}); choose START and INC multiples of {d.micro_batch_size * dp}")
    if cfg.curriculum is not None and cfg.curriculum.max_difficulty > d.seq_length:
        raise ConfigError(f"--deepspeed_config curriculum_learning.max_difficulty ({cfg.curriculum.max_difficulty}) "
                            f"must be <= --seq-length ({d.seq_length})")
    m = cfg.model
    for value, flag in ((m.num_attention_heads, "--num-attention-heads"), (m.ffn_hidden_size, "--ffn-hidden-size"),
                        (m.padded_vocab_size, "padded vocabulary size")):
        if value % tp != 0:
            raise ConfigError(f"{flag} ({value}) must be divisible by --tensor-model-parallel-size ({tp})")
    validate_core_blocks(m, tp)
    if cfg.optimizer_offload.enabled and cfg.parallel.zero_stage:
        raise ConfigError(f"--moe-offload-optimizer nvme and --zero-stage {cfg.parallel.zero_stage} do not combine: "
                          f"the offloaded expert state is not sharded; use one of them")
    if cfg.optimizer_offload.enabled and cfg.moe is None:
        raise ConfigError("--moe-offload-optimizer nvme offloads expert parameters' Adam state, but the model is "
                          "dense (--num-experts 1); add experts or drop the flag")
    if m.recompute_granularity == "selective" and (m.recompute_method or m.recompute_num_layers is not None):
        # Megatron-LM: selective recompute covers the core attention of every layer; method and count apply to full
        logging.getLogger("megatron").warning(
            "--recompute-method/--recompute-num-layers are ignored with --recompute-granularity selective (core "
            "attention is recomputed in every layer)")
    if cfg.distill.enabled:
        _checked(validate_distill, cfg.distill, cfg.moe.num_experts if cfg.moe is not None else (1,))


def configure(argv: Optional[Sequence[str]], world_size: int) -> Tuple[TrainConfig, object, list]:
    """pretrain_gpt.py's flags -> (checked TrainConfig, the tokenizer they name, the notes to log once: flags and
    ds_config keys that change nothing here). The only args -> config step.

    The tokenizer is built here because its vocabulary size, padded for --make-vocab-size-divisible-by and the
    tensor-parallel size, is part of the model config (Megatron pads it the same way while parsing).
    """
    from megatron.tokenizer import build_tokenizer, pad_vocab_size

    args = parse_args(argv)
    tok = tokenizer_config_from_args(args)
    tokenizer = build_tokenizer(tok.tokenizer_type, vocab_file=tok.vocab_file, merge_file=tok.merge_file,
                                tokenizer_model=tok.tokenizer_model)
    tp = args.tensor_model_parallel_size
    padded = pad_vocab_size(tokenizer.vocab_size, tok.make_vocab_size_divisible_by, tp)  # checks TP >= 1
    cp = max(args.context_parallel_size, 1)
    cfg = train_config_from_args(args, padded, dp_size=max(world_size // (tp * cp), 1))  # validate checks world
    validate(cfg, world_size)
    return cfg, tokenizer, list(args.config_notes)
