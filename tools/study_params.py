#!/usr/bin/env python
"""Total and active (per token) parameters of a GPT built from pretrain_gpt.py flags or read from a checkpoint, so
that examples_moe/run_study.sh can show its arms are compared at equal active parameters.

    python tools/study_params.py --arm moe --output outputs/study/params/moe.json -- <pretrain_gpt.py model flags>
    python tools/study_params.py --arm moe --load outputs/study/moe_s1234/checkpoints

Active parameters: everything except the routed experts a token is not sent to, i.e. per MoE layer
(E - k) x one expert's parameters (the router, a shared expert and a Residual-MoE MLP are always active).
Embedding and output head are counted as parameters (tied: once); they are not FLOPs per token of the same kind.
"""
import argparse
import json
import os
import sys


def param_counts(model, topk: int):
    """(total, active per token) of a GPTModel whose MoE layers route each token to `topk` experts."""
    from moe.tagging import is_expert_param

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for mod in model.modules():
        if hasattr(mod, "num_local_experts") and hasattr(mod, "router"):  # a moe.layer.MoELayer
            experts = [p for p in mod.experts.parameters() if is_expert_param(p)]
            per_expert = sum(p.numel() for p in experts) // mod.num_local_experts
            inactive += (mod.num_local_experts - topk) * per_expert
    return total, total - inactive


def from_flags(argv):
    """(total, active) of the model pretrain_gpt.py would build from `argv` (one process, no data read)."""
    from megatron.arguments import configure
    from megatron.model import GPTModel

    argv = list(argv)
    if not {"--train-iters", "--train-samples", "--train-tokens"} & set(argv):
        argv += ["--train-iters", "1"]  # required by the flag checks; no effect on the architecture
    cfg, _, _ = configure(argv, 1)
    model = GPTModel(cfg.model, cfg.moe, None)
    return param_counts(model, cfg.moe.topk if cfg.moe is not None else 1)


def from_checkpoint(load: str, with_routers: bool = False):
    """(total, active) of a saved checkpoint (the architecture it records); with_routers: (total, active,
    [(experts, top-k) per MoE layer, in module order: the order of the training log's 'moe layer i' lines])."""
    from megatron.checkpointing import build_model_from_checkpoint
    from moe.gating import routers

    loaded = build_model_from_checkpoint(load)
    moe = loaded.configs.get("moe")
    total, active = param_counts(loaded.model, moe["topk"] if moe else 1)
    if not with_routers:
        return total, active
    return total, active, [(r.num_experts, r.k) for r in routers(loaded.model)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = []
    if "--" in argv:
        i = argv.index("--")
        argv, flags = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", required=True, help="the arm's name, printed and recorded")
    p.add_argument("--load", default=None, help="a checkpoint instead of model flags after --")
    p.add_argument("--output", default=None, help="JSON {arm, total_params, active_params}")
    p.add_argument("--match", default=None, help="another arm's JSON: fail unless the active parameters match it")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance of --match")
    args = p.parse_args(argv)
    if bool(args.load) == bool(flags):
        print("error: give either --load CKPT or the model flags after --", file=sys.stderr)
        return 2
    try:
        total, active = from_checkpoint(args.load) if args.load else from_flags(flags)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = f"   {args.arm}: {total / 1e6:.3f}M parameters, {active / 1e6:.3f}M active per token"
    if args.match:
        try:
            ref = json.load(open(args.match))
        except (OSError, ValueError) as e:
            print(f"error: --match {args.match}: {e}", file=sys.stderr)
            return 2
        rel = active / ref["active_params"] - 1
        line += f" ({100 * rel:+.1f}% vs {ref['arm']})"
        if abs(rel) > args.tolerance:
            print(f"error: --arm {args.arm}: {active} active parameters differ from {ref['arm']}'s "
                  f"{ref['active_params']} by {100 * rel:+.1f}% (more than --tolerance {args.tolerance:g}); "
                  f"change the expert width or top-k so a token meets as many MLP units as in {ref['arm']}",
                  file=sys.stderr)
            return 2
    print(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"arm": args.arm, "total_params": total, "active_params": active}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
