#!/usr/bin/env python
"""Routing health over the first iterations: train each recipe ("arm") for --iters steps in-process through the
training code and record, per MoE layer and iteration, tokens/expert max/mean (routed pairs before dropping) and
the dropped fraction; write them as CSV + PNG and print the iterations that break the bounds.

    python tools/routing_health.py --iters 50 --output-dir outputs/routing \\
        --arm "deepspeed=--topk 1 --moe-train-capacity-factor 1.25 --moe-loss-coeff 0.01" \\
        --arm "modern=--moe-router-score-function sigmoid --moe-router-enable-expert-bias" \\
        -- <pretrain_gpt.py flags shared by every arm: model, data, batch, LR, tokenizer ...>

Iteration 1's figures are the routing at initialisation (its forward runs before the first update). An arm's flags
come after the shared ones, so an arm may override a shared flag. A --train-iters among them sets the LR
schedule's length (the run stops after --iters regardless); without one the schedule is --iters long. The bounds (issue 28): max/mean <= 2.0 and
dropped <= 5% from iteration 20 on.
"""
import argparse
import csv
import os
import shlex
import sys

MAX_OVER_MEAN = 2.0  # tokens/expert max/mean bound
MAX_DROPPED = 0.05  # dropped fraction bound (capacity mode)
FROM_ITERATION = 20  # the bounds hold from this iteration on

_REPLACED = {"--save", "--save-interval", "--load", "--log-interval", "--eval-interval",
             "--tensorboard-dir", "--exit-interval", "--exit-duration-in-mins"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                usage="%(prog)s [options] -- <pretrain_gpt.py flags>")
    p.add_argument("--iters", type=int, default=50, help="optimizer steps per arm")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="a recipe: its name and the flags added to the shared ones (repeatable; none: one arm "
                        "'run' with the shared flags alone)")
    p.add_argument("--output-dir", required=True, help="writes routing_health.csv and routing_health.png here")
    p.add_argument("--title", default="", help="the PNG's title")
    p.add_argument("--center-router-input", default=None,
                   choices=["ema", "batch", "prefix", "prefix_norm", "prefix_proj", "feature_std", "whiten"],
                   help="experiment: routers see their input minus a token mean (ema: of past batches; batch: of "
                        "this micro-batch; prefix: of the same sequence's earlier tokens)")
    p.add_argument("--freeze-router", action="store_true",
                   help="experiment: router weights get no gradient (they keep their initial values)")
    p.add_argument("--router-lr-mult", type=float, default=None,
                   help="experiment: each step, the router weights keep only this share of the optimizer's update "
                        "(AdamW's update is linear in the LR: a router-only LR of LR x this)")
    p.add_argument("--diagnose", type=int, nargs="*", default=None, metavar="ITER",
                   help="experiment: at these iterations print, per MoE layer, what fills its fullest expert (top "
                        "token ids, early positions)")
    p.add_argument("--center-momentum", type=float, default=0.9, help="experiment: the ema's weight on its past")
    p.add_argument("--attribute", action="store_true",
                   help="experiment: also write attribution.csv, which part of the residual stream (embedding, "
                        "attention, MLP, their output biases) carries the router input's common direction")
    p.add_argument("--router-init-std", type=float, default=None,
                   help="experiment: draw every router weight from N(0, std^2) before the first step")
    p.add_argument("--plot-csv", nargs="+", default=None, metavar="[LABEL=]CSV",
                   help="no training: plot these routing_health.csv files (arms of separate runs) into --output-dir; "
                        "LABEL= prefixes that file's arm names (arms of the same name from different runs)")
    p.add_argument("--layer-max", action="store_true",
                   help="plot one line per arm: each iteration's worst MoE layer (many arms or layers)")
    if argv is None:
        argv = sys.argv[1:]
    ours, train = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(ours)
    if args.iters < 1:
        p.error(f"--iters ({args.iters}) must be >= 1")
    arms = []
    for a in args.arm or ["run="]:
        if "=" not in a:
            p.error(f"--arm {a!r}: expected NAME=FLAGS, e.g. 'modern=--moe-router-enable-expert-bias'")
        name, flags = a.split("=", 1)
        arms.append((name, shlex.split(flags)))
    return args, strip_replaced(train), arms


def strip_replaced(argv):
    """The training flags without those this tool sets itself (length, saving, logging cadence)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in _REPLACED:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def layer_rows(moe_raw):
    """Per MoE layer of one iteration's micro-batch stats: (max/mean tokens per expert, dropped fraction), the
    counts summed over the iteration's micro-batches (a global-batch view), the dropped fraction averaged."""
    import torch

    rows = []
    for layer in range(len(moe_raw[0]) if moe_raw else 0):
        stats = [m[layer] for m in moe_raw]
        counts = torch.stack([s.tokens_per_expert.float() for s in stats]).sum(0)
        mean = float(counts.mean())
        rows.append((float(counts.max()) / mean if mean > 0 else 0.0,
                     sum(float(s.dropped_fraction) for s in stats) / len(stats)))
    return rows


def reinit_routers(model, std):
    """An experiment knob, not a training flag: every router weight drawn again from N(0, std^2) (the model's own
    init is N(0, --init-method-std^2)). Before the first step, so the optimizer has no state yet."""
    import torch

    from moe.gating import routers

    with torch.no_grad():
        for r in routers(model):
            r.weight.normal_(0.0, std)


def center_router_inputs(model, mode="ema", momentum=0.9):
    """An experiment knob, not a training flag: every router sees its input minus a token mean, removing the common
    direction the hidden states fall into early in training. mode 'ema': minus m, an exponential moving average of
    past training inputs' token means (m = 0 at the first step; updated after use, so a batch never sees its own
    mean). mode 'batch': in training minus this micro-batch's own token mean (detached; BatchNorm-style: a token's
    routing then depends on the batch's mean, future positions included), m kept as the EMA for evaluation.
    mode 'prefix': x_t minus the mean of x_0..x_{t-1} of its own sequence (causal; x_0 as it is)."""
    import torch

    from moe.gating import routers

    def hook(router, args, kwargs):
        x = args[0]
        if mode == "whiten":  # with --moe-router-center-input causal: x times Sigma^-1/2, Sigma an EMA over past
            # training batches of the covariance of the causally centred inputs (identity at the first step; updated
            # after use); the router then centres and scales to RMS 1 as usual
            from moe.gating import causal_centered
            w = getattr(router, "_health_whiten", None)
            y = x @ w.to(x.dtype) if w is not None else x
            if router.training and torch.is_grad_enabled():
                c = causal_centered(x.detach().double(), kwargs.get("num_sequences", 1))  # RMS 1 per token
                cov = c.T @ c / c.shape[0]
                router._health_cov = cov if w is None else momentum * router._health_cov + (1 - momentum) * cov
                ev, vec = torch.linalg.eigh(router._health_cov)
                router._health_whiten = (vec * ev.clamp(min=1e-3 * ev.max()).rsqrt()) @ vec.T
            return (y,) + tuple(args[1:]), kwargs
        if mode == "feature_std":  # with --moe-router-center-input causal: each feature divided by its RMS over
            # past training batches' causally centred inputs (EMA; 1 at the first step; updated after use, so a
            # batch never sees its own statistics); the router then centres and scales to RMS 1 as usual
            from moe.gating import causal_centered
            s = getattr(router, "_health_std", None)
            y = x / s.to(x.dtype) if s is not None else x
            if router.training and torch.is_grad_enabled():
                c = causal_centered(x.detach().float(), kwargs.get("num_sequences", 1))  # RMS 1 per token
                rms = c.pow(2).mean(0).sqrt() + 1e-6
                router._health_std = rms if s is None else momentum * s + (1 - momentum) * rms
            return (y,) + tuple(args[1:]), kwargs
        if mode in ("prefix", "prefix_norm", "prefix_proj"):
            xs = x.view(kwargs.get("num_sequences", 1), -1, x.shape[-1])
            prev = torch.cumsum(xs.detach().float(), 1) - xs.detach().float()
            n = torch.arange(xs.shape[1], device=x.device).clamp(min=1).view(1, -1, 1)
            if mode == "prefix_proj":  # the component along the earlier tokens' mean direction removed
                u = prev / (prev.norm(dim=-1, keepdim=True) + 1e-6)
                y = (xs - (xs * u).sum(-1, keepdim=True) * u).reshape(x.shape)
                y = y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(y.dtype)
                return (y,) + tuple(args[1:]), kwargs
            y = x - (prev / n).reshape(x.shape).to(x.dtype)
            if mode == "prefix_norm":  # each token's centred vector scaled to rms 1 (the logits keep their scale)
                y = y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(y.dtype)
            return (y,) + tuple(args[1:]), kwargs
        m = getattr(router, "_health_mean", None)
        training = router.training and torch.is_grad_enabled()
        if training:
            mean = x.detach().float().mean(0)
        if training and mode == "batch":
            y = x - mean.to(x.dtype)
        else:
            y = x - m.to(x.dtype) if m is not None else x
        if training:
            router._health_mean = mean if m is None else momentum * m + (1 - momentum) * mean
        return (y,) + tuple(args[1:]), kwargs

    return [r.register_forward_pre_hook(hook, with_kwargs=True) for r in routers(model)]


def attribution_hooks(model):
    """Forward hooks measuring which part of the residual stream carries the router inputs' common direction.
    The residual x entering MoE layer L's norm is emb + sum over earlier layers of (attn + mlp) + attn_L; with
    m = mean_t x, component c's share of the common direction is mean_t(c) . m / |m|^2 (the shares sum to 1 without
    hidden dropout, which acts after the recorded outputs).
    Returns (rows: one dict per MoE layer and forward, hooks)."""

    rows, means = [], {}

    def mean_of(out):
        out = out[0] if isinstance(out, tuple) else out
        return out.detach().float().reshape(-1, out.shape[-1]).mean(0)

    def save(key):
        def hook(_, __, out):
            means[key] = mean_of(out)
        return hook

    hooks = [model.word_embeddings.register_forward_hook(save("emb"))]
    if getattr(model, "position_embeddings", None) is not None:
        hooks.append(model.position_embeddings.register_forward_hook(save("pos")))

    def bias_mean(mod):
        """The constant output bias of a dense attention/MLP output projection (0 when none)."""
        for name in ("dense", "dense_4h_to_h"):
            lin = getattr(mod, name, None)
            if lin is not None and getattr(lin, "bias", None) is not None:
                return lin.bias.detach().float()
        return None

    for i, layer in enumerate(model.layers):
        hooks.append(layer.self_attention.register_forward_hook(save(("attn", i))))
        hooks.append(layer.mlp.register_forward_hook(save(("mlp", i))))
        if hasattr(layer.mlp, "router"):
            def pre(_, args, i=i):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                m = x.mean(0)
                m2 = float(m.pow(2).sum())
                row = {"layer": i, "share": m2 / float(x.pow(2).sum(1).mean())}
                parts = {"emb": [means.get("emb"), means.get("pos")],
                         "attn": [means.get(("attn", j)) for j in range(i + 1)],
                         "mlp": [means.get(("mlp", j)) for j in range(i)],
                         "bias": [bias_mean(model.layers[j].self_attention) for j in range(i + 1)]
                         + [bias_mean(model.layers[j].mlp) for j in range(i)]
                         + [bias_mean(model.layers[j].mlp.shared_expert.mlp) for j in range(i)
                            if getattr(model.layers[j].mlp, "shared_expert", None) is not None]}
                for k, vs in parts.items():
                    row[k] = sum(float(v @ m) for v in vs if v is not None) / max(m2, 1e-30)
                rows.append(row)
            hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(pre))
    return rows, hooks


def diagnose_hooks(model, tokenizer=None):
    """Forward hooks keeping every micro-batch's tokens and every router's expert choices since the last report;
    report() prints, per MoE layer, the fullest expert's share of the iteration's pairs (all its micro-batches: the
    global-batch view the bound is checked on) and which tokens/positions fill it, then starts over. A recompute's
    forward (inside backward) is not recorded twice."""
    import torch

    from moe.gating import _counting as counting  # a training forward: not a recompute, not the whitening refresh
    from moe.gating import routers

    seen = {"tokens": []}

    def keep_tokens(_, args):
        if counting():
            seen["tokens"].append(args[0].detach())

    def keep_choice(i):
        def hook(_, __, out):
            if counting():
                seen.setdefault(i, []).append(out.expert_TK.detach())
        return hook

    hooks = [model.register_forward_pre_hook(keep_tokens)]
    hooks += [r.register_forward_hook(keep_choice(i)) for i, r in enumerate(routers(model))]

    experts = [r.num_experts for r in routers(model)]

    def report(it):
        """Print iteration it's view (it None: print nothing), then forget what was kept."""
        if it is None or not seen["tokens"]:
            forget()
            return
        tokens = torch.cat(seen["tokens"])  # [B, S], the iteration's micro-batches one after another
        flat = tokens.reshape(-1)
        pos = torch.arange(tokens.shape[-1]).repeat(tokens.shape[0])
        for i in sorted(k for k in seen if isinstance(k, int)):
            e_TK = torch.cat(seen[i])
            counts = torch.bincount(e_TK.reshape(-1), minlength=experts[i])
            top = int(counts.argmax())
            in_top = (e_TK == top).any(1)
            ids, n = torch.unique(flat[in_top], return_counts=True)
            order = n.argsort(descending=True)[:6]
            freq = {int(t): int((flat == t).sum()) for t in ids[order]}
            words = [(tokenizer.detokenize([int(t)]) if tokenizer is not None else str(int(t))) for t in ids[order]]
            per_seq = in_top.view(tokens.shape[0], -1).float().mean(1)  # share of each sequence's tokens in it
            print(f"  it {it} layer {i}: per-sequence share in the fullest expert "
                  + " ".join(f"{100 * float(v):.0f}%" for v in per_seq.sort(descending=True).values))
            print(f"  it {it} layer {i}: fullest expert {top}: {float(counts.max() / counts.float().mean()):.2f}x "
                  f"mean, {int(in_top.sum())} of {flat.numel()} tokens, "
                  f"{100 * float((pos[in_top] < 16).float().mean()):.0f}% at "
                  f"positions < 16; top tokens " + ", ".join(
                      f"{w!r} {int(c)}/{freq[int(t)]}" for w, t, c in zip(words, ids[order], n[order])), flush=True)
        forget()

    def forget():
        seen.clear()
        seen["tokens"] = []

    return hooks, report


def run_arm(train_argv, iters, on_record=None, router_init_std=None, center=None, momentum=0.9, attribute=None,
            freeze_router=False, diagnose=None, router_lr_mult=None):
    """[(iteration, lm loss, [(max/mean, dropped) per MoE layer])] over `iters` steps of one arm; on_record(record)
    after each step (the CSV grows as the run goes: a long run stopped early keeps what it measured)."""
    import torch
    from megatron.training import setup_from_argv, train_step

    given = any(a.split("=", 1)[0] in ("--train-iters", "--train-tokens") for a in train_argv)
    length = [] if given else ["--train-iters", str(iters)]  # a given length keeps its LR schedule
    st, train_iter, _, _ = setup_from_argv(train_argv + length + ["--log-interval", str(10 ** 9),
                                                                  "--eval-interval", str(10 ** 9)])
    if router_init_std is not None:
        reinit_routers(st.model, router_init_std)
    if freeze_router:
        from moe.gating import routers
        for r in routers(st.model):
            r.weight.register_hook(lambda g: g * 0)
    shares, hooks = common_direction_hooks(st.model)  # registered first: the share of the input before centering
    if center:
        hooks += center_router_inputs(st.model, center, momentum)
    report = None
    if diagnose:
        more, report = diagnose_hooks(st.model, getattr(st, "tokenizer", None))
        hooks += more
    attr_rows = None
    if attribute is not None:
        attr_rows, more = attribution_hooks(st.model)
        hooks += more
    out = []
    try:
        for _ in range(iters):
            if router_lr_mult is not None:
                from moe.gating import routers
                before = [r.weight.detach().clone() for r in routers(st.model)]
            m = train_step(st, train_iter)
            if router_lr_mult is not None:
                with torch.no_grad():
                    for r, w0 in zip(routers(st.model), before):
                        r.weight.copy_(w0 + router_lr_mult * (r.weight - w0))
            rows = layer_rows(m["moe_raw"])
            last = shares[-len(rows):] if len(shares) >= len(rows) else [float("nan")] * len(rows)
            # the common-direction share of the last micro-batch (its forward ran last), per layer
            out.append((st.iteration, m["lm_loss"], [(r, d, c) for (r, d), c in zip(rows, last)]))
            shares.clear()
            if report is not None:  # every iteration: prints the asked ones, forgets the others
                report(st.iteration if st.iteration in diagnose else None)
            if attr_rows is not None:
                n_moe = len(rows)
                for r in attr_rows[-n_moe:]:
                    attribute(dict(r, iteration=st.iteration))
                attr_rows.clear()
            if on_record is not None:
                on_record(out[-1])
        st.optimizer.synchronize()
    finally:
        for h in hooks:
            h.remove()
        st.resources.close()
    return out


def common_direction_hooks(model):
    """Forward pre-hooks on every router recording the common-direction share of its input x [T, D]:
    |mean_t x|^2 / mean_t |x|^2 (0 when tokens point every way, 1 when all are the same vector). A large share makes
    every token's logits move together, so one expert takes them all. Returns (list the shares go to, hooks)."""
    import torch

    from moe.gating import routers

    shares = []

    def hook(_, args):
        if not torch.is_grad_enabled():  # --moe-router-input-whitening-refresh's forward: not a training one
            return
        x = args[0].detach().float()
        shares.append(float(x.mean(0).pow(2).sum() / x.pow(2).sum(1).mean()))

    return shares, [r.register_forward_pre_hook(hook) for r in routers(model)]


def violations(records):
    """Iterations >= FROM_ITERATION where some layer breaks a bound: [(iteration, layer, max/mean, dropped)]."""
    return [(it, i, x[0], x[1]) for it, _, layers in records if it >= FROM_ITERATION
            for i, x in enumerate(layers) if x[0] > MAX_OVER_MEAN or x[1] > MAX_DROPPED]


CSV_HEADER = ["arm", "iteration", "layer", "max_over_mean", "dropped", "lm_loss", "common_share"]


def csv_rows(name, record):
    it, loss, layers = record
    return [[name, it, i, f"{x[0]:.4f}", f"{x[1]:.4f}", f"{loss:.5f}", f"{x[2]:.4f}" if len(x) > 2 else ""]
            for i, x in enumerate(layers)]


def read_csv(path):
    """[(arm, records)] from a routing_health.csv (to re-plot, or to merge runs made separately)."""
    results = {}
    for row in csv.DictReader(open(path)):
        records = results.setdefault(row["arm"], {})
        it = int(row["iteration"])
        share = row.get("common_share") or "nan"
        records.setdefault(it, (it, float(row["lm_loss"]), []))[2].append(
            (float(row["max_over_mean"]), float(row["dropped"]), float(share)))
    return [(name, [recs[i] for i in sorted(recs)]) for name, recs in results.items()]


def layer_max(results):
    """Each arm's records with one pseudo-layer per iteration: the worst max/mean and dropped fraction over its MoE
    layers and their mean common share (--layer-max: one line per arm)."""
    out = []
    for name, records in results:
        merged = [(it, loss, [(max(x[0] for x in layers), max(x[1] for x in layers),
                               sum(x[2] for x in layers) / len(layers) if all(len(x) > 2 for x in layers)
                               else float("nan"))]) for it, loss, layers in records]
        out.append((f"{name} (worst layer)", merged))
    return out


def write_png(png_path, results, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for a, (name, records) in enumerate(results):
        its = [it for it, _, _ in records]
        n_layers = len(records[0][2]) if records else 0
        for i in range(n_layers):
            kw = dict(color=colors[a % len(colors)], alpha=0.8, linestyle=["-", "--", ":", "-."][i % 4],
                      label=f"{name} layer {i}" if n_layers > 1 else name)
            axes[0].plot(its, [layers[i][0] for _, _, layers in records], **kw)
            axes[1].plot(its, [100 * layers[i][1] for _, _, layers in records], **kw)
            axes[3].plot(its, [layers[i][2] if len(layers[i]) > 2 else float("nan") for _, _, layers in records],
                         **kw)
        axes[2].plot(its, [loss for _, loss, _ in records], color=colors[a % len(colors)], label=name)
    axes[0].axhline(MAX_OVER_MEAN, color="red", linestyle="--", linewidth=1)
    axes[1].axhline(100 * MAX_DROPPED, color="red", linestyle="--", linewidth=1)
    for ax in axes[:2]:
        ax.axvline(FROM_ITERATION, color="gray", linestyle=":", linewidth=1)
    axes[0].set_ylabel("tokens/expert max / mean")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("dropped tokens (%)")
    axes[2].set_ylabel("training lm loss")
    axes[3].set_ylabel("router input: common-direction share")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def summary(name, records):
    """One line per arm: routing at init, worst from FROM_ITERATION on, the final loss."""
    init = [x[:2] for x in records[0][2]]
    late = [[x[:2] for x in layers] for it, _, layers in records if it >= FROM_ITERATION]
    worst_r = max((r for layers in late for r, _ in layers), default=float("nan"))
    worst_d = max((d for layers in late for _, d in layers), default=float("nan"))
    bad = violations(records)
    if not late:
        return (f"{name}: init max/mean {max(r for r, _ in init):.2f}, dropped {100 * max(d for _, d in init):.1f}% | "
                f"lm loss {records[-1][1]:.3f} at {records[-1][0]} | fewer than {FROM_ITERATION} iterations")
    return (f"{name}: init max/mean {max(r for r, _ in init):.2f}, dropped {100 * max(d for _, d in init):.1f}% | "
            f"from iteration {FROM_ITERATION}: worst max/mean {worst_r:.2f}, worst dropped {100 * worst_d:.1f}% | "
            f"lm loss {records[-1][1]:.3f} at {records[-1][0]} | "
            + ("balanced" if not bad else f"{len(bad)} layer-iterations out of bounds (first: iteration {bad[0][0]})"))


def attribution_writer(output_dir, name):
    """A callback writing attribution rows to <output_dir>/attribution_<name>.csv as they come."""
    f = open(os.path.join(output_dir, f"attribution_{name}.csv"), "w", newline="")
    w = csv.DictWriter(f, ["iteration", "layer", "share", "emb", "attn", "mlp", "bias"])
    w.writeheader()

    def write(row):
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        f.flush()
    return write


def main(argv=None) -> int:
    from megatron.errors import UserError

    args, train_argv, arms = parse(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    csv_path, png_path = os.path.join(args.output_dir, "routing_health.csv"), os.path.join(args.output_dir,
                                                                                        "routing_health.png")
    if args.plot_csv:
        results = []
        for spec in args.plot_csv:
            label, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else ("", spec)
            try:
                arms = read_csv(path)
            except OSError as e:
                print(f"error: --plot-csv {path}: {e.strerror}", file=sys.stderr)
                return 2
            except (KeyError, ValueError) as e:
                print(f"error: --plot-csv {path}: not a routing_health.csv ({e!r}); pass the CSV this tool wrote",
                      file=sys.stderr)
                return 2
            results += [(f"{label} {name}" if label else name, records) for name, records in arms]
        for name, records in results:
            print(summary(name, records))
        write_png(png_path, layer_max(results) if args.layer_max else results, args.title)
        print(f"wrote {png_path}")
        return 0
    results = []
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for name, flags in arms:
            def on_record(rec, name=name):
                w.writerows(csv_rows(name, rec))
                f.flush()
                print(f"{name} iteration {rec[0]}: lm loss {rec[1]:.3f} | max/mean "
                      + " ".join(f"{x[0]:.2f}" for x in rec[2]) + " | dropped "
                      + " ".join(f"{100 * x[1]:.1f}%" for x in rec[2]) + " | common share "
                      + " ".join(f"{x[2]:.2f}" for x in rec[2]), flush=True)
            try:
                attribute = attribution_writer(args.output_dir, name) if args.attribute else None
                records = run_arm(train_argv + flags, args.iters, on_record, args.router_init_std,
                                  args.center_router_input, args.center_momentum, attribute,
                                  args.freeze_router, args.diagnose,
                                  args.router_lr_mult)
            except UserError as e:
                print(f"error: arm {name}: {e}", file=sys.stderr)
                return 2
            if not records or not records[0][2]:
                print(f"error: arm {name}: the model has no MoE layer (set --num-experts)", file=sys.stderr)
                return 2
            results.append((name, records))
            print(summary(name, records), flush=True)
    write_png(png_path, results, args.title)
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
