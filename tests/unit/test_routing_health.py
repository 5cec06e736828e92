"""Routing health (issue 28, docs/routing_health.md): the demo's default recipe routes real text in balance at
initialisation; tools/routing_health.py records per-layer load over iterations; tools/demo_summary.py reads the
demo's log."""
import csv
import json
import os
import sys

import pytest
import torch

from megatron.data.data_files import DataFileError, default_data_dir, resolve
from tests.conftest import ROOT, tiny_train_argv

sys.path.insert(0, os.path.join(ROOT, "tools"))
import demo_summary  # noqa: E402
import routing_health  # noqa: E402

# the demo's model and default routing recipe (examples_moe/demo.sh: ROUTER=modern, CENTER=causal)
DEMO_MODEL = ["--num-layers", "6", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "256",
              "--max-position-embeddings", "256", "--normalization", "RMSNorm", "--swiglu",
              "--position-embedding-type", "rope", "--ffn-hidden-size", "344", "--num-experts", "16",
              "--expert-interval", "2"]
DEMO_ROUTER = ["--moe-router-center-input", "causal", "--moe-router-input-whitening-momentum", "0.3",
               "--moe-router-score-function", "sigmoid",
               "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2",
               "--moe-aux-loss-coeff", "1e-3",
               "--moe-router-topk", "2", "--moe-ffn-hidden-size", "128", "--moe-shared-expert-intermediate-size", "128"]
# Bound at initialisation: tokens/expert max/mean of 2048 real tokens (4096 top-2 pairs) over 16 experts. Uniformly
# random choices give ~1.3 (the largest of 16 counts of mean 256); real text is less even because frequent tokens
# ("," "the" "of") reach a layer with similar hidden states. Measured on these GPT-2 tokens (seed 1234): without
# centring 1.50/1.80/1.50, with causal centring 1.31/1.28/1.24; on the demo's own SentencePiece batches
# (tools/routing_health.py, iteration 1) 1.90/1.46/1.97 without and 1.48/1.35/1.54 with causal centring. The bound
# is the 2.0.
INIT_MAX_OVER_MEAN = 2.0


def _corpus_tokens(tokenizer, n_seq, seq_len):
    """n_seq sequences of seq_len GPT-2 tokens of real text: consecutive windows of the corpus's first novel."""
    ids = []
    with open(resolve("corpus", default_data_dir(), verify=False), encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            ids += tokenizer.tokenize(text[20000:20000 + 8 * seq_len * n_seq])  # past the front matter
            if len(ids) >= n_seq * seq_len:
                break
    assert len(ids) >= n_seq * seq_len
    return torch.tensor(ids[:n_seq * seq_len]).view(n_seq, seq_len)


def _have_corpus():
    try:
        for name in ("corpus", "gpt2-vocab", "gpt2-merges"):
            resolve(name, default_data_dir(), verify=False)
        return True
    except DataFileError:
        return False


@pytest.mark.skipif(not _have_corpus(), reason="shared data (corpus, GPT-2 BPE) not found")
@pytest.mark.parametrize("seed", [1234])
def test_default_recipe_routes_real_text_in_balance_at_init(seed):
    """The demo's model and routing at initialisation on 8 x 256 tokens of the novels: every MoE layer's
    tokens/expert max/mean <= INIT_MAX_OVER_MEAN, nothing dropped (dropless)."""
    from megatron.arguments import configure
    from megatron.training import build_model, set_seed

    data = default_data_dir()
    argv = DEMO_MODEL + DEMO_ROUTER + ["--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "1",
                                       "--lr", "1e-3", "--seed", str(seed), "--tokenizer-type", "GPT2BPETokenizer",
                                       "--vocab-file", str(resolve("gpt2-vocab", data, verify=False)),
                                       "--merge-file", str(resolve("gpt2-merges", data, verify=False))]
    cfg, tokenizer, _ = configure(argv, 1)
    set_seed(cfg.data.seed)
    model = build_model(cfg, None, torch.device("cpu"))
    tokens = _corpus_tokens(tokenizer, 8, 256)
    with torch.no_grad():
        stats = model(tokens, return_logits=False).moe_stats  # no LM head: the routers are what is measured
    assert len(stats) == 3
    for s in stats:
        counts = s.tokens_per_expert.float()
        assert float(counts.sum()) == 2 * tokens.numel()  # top-2: every token twice
        assert float(counts.max() / counts.mean()) <= INIT_MAX_OVER_MEAN, counts.tolist()
        assert float(s.dropped_fraction) == 0.0


def test_tool_records_load_per_layer_and_iteration(tiny_corpus, tmp_path):
    """tools/routing_health.py in-process on the tiny corpus: two arms, a CSV row per (arm, iteration, layer),
    a PNG; the PNG re-drawn from the CSV."""
    train = tiny_train_argv(tiny_corpus, tmp_path, "--num-experts", "4", "--train-iters", "20",
                            "--save", str(tmp_path / "nope"))
    arms = ["--arm", "ds=--topk 1 --moe-train-capacity-factor 1.0",
            "--arm", "modern=--moe-router-score-function sigmoid --moe-router-enable-expert-bias --hidden-dropout 0"]
    assert routing_health.main(["--iters", "3", "--output-dir", str(tmp_path / "rh"), "--attribute", *arms, "--",
                                *train]) == 0
    attr = list(csv.DictReader(open(tmp_path / "rh" / "attribution_modern.csv")))
    assert [r["iteration"] for r in attr] == ["1", "2", "3"]  # one MoE layer
    # without hidden dropout the parts of the common direction add up to the whole (fp32 sums over 64 tokens; 4-decimal CSV)
    assert all(abs(float(r["emb"]) + float(r["attn"]) + float(r["mlp"]) - 1.0) < 2e-3 for r in attr)
    rows = list(csv.DictReader(open(tmp_path / "rh" / "routing_health.csv")))
    assert [(r["arm"], r["iteration"], r["layer"]) for r in rows] == \
        [(a, str(i), str(layer)) for a in ("ds", "modern") for i in (1, 2, 3) for layer in (0,)]
    assert all(float(r["max_over_mean"]) >= 1.0 and 0.0 <= float(r["common_share"]) <= 1.0 for r in rows)
    assert all(float(r["dropped"]) == 0.0 for r in rows if r["arm"] == "modern")  # dropless
    assert os.path.getsize(tmp_path / "rh" / "routing_health.png") > 1000
    assert not (tmp_path / "nope").exists()
    assert [n for n, _ in routing_health.read_csv(tmp_path / "rh" / "routing_health.csv")] == ["ds", "modern"]
    assert routing_health.main(["--output-dir", str(tmp_path / "re"), "--plot-csv",
                                str(tmp_path / "rh" / "routing_health.csv")]) == 0
    assert os.path.getsize(tmp_path / "re" / "routing_health.png") > 1000


def test_diagnose_reports_the_whole_iteration(tiny_corpus, tmp_path, capsys):
    """--diagnose reads every micro-batch of the iteration (2 here: micro 2, global 4), not only the last: its fullest
    expert's load over the mean equals the CSV's max/mean, and it counts the global batch's 4 x 32 tokens."""
    import re

    train = tiny_train_argv(tiny_corpus, tmp_path, "--num-experts", "4", "--train-iters", "20")
    arm = ["--arm", "modern=--moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-topk 1"]
    assert routing_health.main(["--iters", "3", "--output-dir", str(tmp_path / "rh"), "--diagnose", "2", "3", *arm,
                                "--", *train]) == 0
    found = re.findall(r"it (\d) layer 0: fullest expert \d+: ([0-9.]+)x mean, \d+ of (\d+) tokens",
                       capsys.readouterr().out)
    rows = csv.DictReader(open(tmp_path / "rh" / "routing_health.csv"))
    csv_ratio = {r["iteration"]: float(r["max_over_mean"]) for r in rows}
    assert [it for it, _, _ in found] == ["2", "3"]
    for it, ratio, tokens in found:
        assert int(tokens) == 4 * 32
        assert abs(float(ratio) - csv_ratio[it]) < 0.006, (it, ratio, csv_ratio[it])


def test_plot_csv_labels_runs_and_plots_the_worst_layer(tmp_path, capsys):
    """--plot-csv LABEL=CSV keeps same-named arms of separate runs apart; --layer-max plots each iteration's worst
    layer (max/mean and dropped: the maxima over layers; common share: their mean)."""
    path = tmp_path / "rh.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(routing_health.CSV_HEADER)
        for it in (1, 2):
            w.writerows(routing_health.csv_rows("base", (it, 7.0, [(1.5, 0.0, 0.2), (2.5 + it, 0.01, 0.4)])))
    assert routing_health.main(["--output-dir", str(tmp_path / "png"), "--layer-max",
                                "--plot-csv", f"moe={path}", f"pr={path}"]) == 0
    out = capsys.readouterr().out
    assert "moe base:" in out and "pr base:" in out
    merged = routing_health.layer_max(routing_health.read_csv(path))
    assert merged[0][0] == "base (worst layer)"
    assert [(it, layers[0][:2]) for it, _, layers in merged[0][1]] == [(1, (3.5, 0.01)), (2, (4.5, 0.01))]
    assert all(layers[0][2] == pytest.approx(0.3) for _, _, layers in merged[0][1])
    assert os.path.getsize(tmp_path / "png" / "routing_health.png") > 1000


def test_plot_csv_bad_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for bad in (str(tmp_path / "missing.csv"), str(tmp_path / "other.csv")):
        assert routing_health.main(["--output-dir", str(tmp_path / "png"), "--plot-csv", f"x={bad}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --plot-csv {bad}:") and "\n" not in err
    assert not (tmp_path / "png" / "routing_health.png").exists()


def test_violations_apply_the_bounds_from_iteration_20():
    records = [(1, 3.0, [(9.0, 0.9, 0.1)]), (20, 2.0, [(2.0, 0.05, 0.1), (2.1, 0.0, 0.1)]), (21, 2.0, [(1.5, 0.06, 0.1)])]
    assert routing_health.violations(records) == [(20, 1, 2.1, 0.0), (21, 0, 1.5, 0.06)]
    assert "2 layer-iterations out of bounds (first: iteration 20)" in routing_health.summary("x", records)


@pytest.mark.parametrize("fields", [dict(topk=1), dict(topk=2, router_family="megatron", score_function="sigmoid",
                                                      expert_bias=True)])
def test_centred_router_routes_like_a_router_on_centred_inputs(fields):
    """--moe-router-center-input against the same router fed x - mean by hand: training subtracts the micro-batch's
    own mean (exact: the same fp32 ops) and folds it into input_mean (a plain mean over the first forwards);
    evaluation subtracts input_mean. Both families."""
    from moe.config import MoEConfig
    from moe.gating import TopKRouter

    torch.manual_seed(0)
    centred = TopKRouter(MoEConfig(num_experts=4, drop_tokens=False, router_input_centering=True, **fields), 8)
    plain = TopKRouter(MoEConfig(num_experts=4, drop_tokens=False, **fields), 8)
    plain.weight.data.copy_(centred.weight.data)
    xs = [torch.randn(32, 8) + 3.0 * torch.ones(8) for _ in range(2)]  # a strong common direction
    for x in xs:
        got, want = centred(x), plain(x - x.mean(0))
        assert torch.equal(got.expert_TK, want.expert_TK) and torch.equal(got.gates_TK, want.gates_TK)
    mean = (xs[0].mean(0) + xs[1].mean(0)) / 2  # two forwards: rate max(1/n, 0.1) = 1, 1/2
    assert torch.allclose(centred.input_mean, mean, atol=1e-6)  # fp32 running mean of two means
    centred.eval(), plain.eval()
    x = torch.randn(5, 8)
    assert torch.equal(centred(x).expert_TK, plain(x - centred.input_mean).expert_TK)
    assert "input_mean" in centred.state_dict() and "input_mean" not in plain.state_dict()


LOG = """\
 iteration       10/     120 | consumed samples: 320 | lm loss: 7.500000E+00 | grad norm: 1.0
   moe layer 0: aux 1.0100 | tokens/expert min 100 max 5000 cv 1.2 | dropped 40.00%
 validation loss at iteration 40 | lm loss value: 6.500000E+00 | lm loss PPL: 6.6E+02
 iteration      120/     120 | consumed samples: 3840 | lm loss: 5.800000E+00 | grad norm: 0.5
   moe layer 0: aux 1.0010 | tokens/expert min 800 max 1300 cv 0.1 | dropped 0.00%
   moe layer 1: aux 1.0010 | tokens/expert min 900 max 1200 cv 0.1 | dropped 0.00%
 validation loss at the end of training (validation set) | lm loss value: 5.900000E+00 | lm loss PPL: 3.6E+02
"""


def test_demo_summary_reads_the_log_and_writes_the_curve(tmp_path, capsys):
    (tmp_path / "train.log").write_text(LOG)
    (tmp_path / "sample.txt").write_text("It was a dark and stormy night, and the rain\n")
    png = tmp_path / "loss_curve.png"
    assert demo_summary.main(["--log", str(tmp_path / "train.log"), "--png", str(png), "--tokens-per-expert-mean",
                              "1024", "--sample-file", str(tmp_path / "sample.txt")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("demo: validation ppl 365.0 | expert load max/mean 1.27, 1.17 (dropped 0.0%): balanced")
    assert last.endswith("sample: 'It was a dark and stormy night, and the rain'")
    assert os.path.getsize(png) > 1000
    parsed = demo_summary.parse_log(LOG)
    assert parsed["train"] == [(10, 7.5), (120, 5.8)] and parsed["valid"] == [(40, 6.5)]


def _brute_causal_centered(x_TD, num_sequences, eps=1e-6):
    """float64 loop: each token minus the mean of its sequence's earlier tokens, then RMS 1 (the first token only
    scaled)."""
    x = x_TD.double().view(num_sequences, -1, x_TD.shape[-1])
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            y = x[b, t] - x[b, :t].mean(0) if t > 0 else x[b, t]
            out[b, t] = y / torch.sqrt(y.pow(2).mean() + eps)
    return out.view(x_TD.shape)


def test_causal_centring_is_the_mean_of_earlier_tokens_removed():
    """moe.gating.causal_centered against a float64 loop over positions (fp32 cumulative sums over 24 positions:
    atol 1e-5 on RMS-1 outputs, ~100 fp32 ulps); the same for the router: its choice equals a plain router fed the
    loop's output."""
    from moe.config import MoEConfig
    from moe.gating import TopKRouter, causal_centered

    torch.manual_seed(0)
    x = torch.randn(3 * 24, 16) + 4.0 * torch.randn(16)  # 3 sequences of 24 with a strong common direction
    want = _brute_causal_centered(x, 3)
    assert torch.allclose(causal_centered(x, 3).double(), want, atol=1e-5)
    fields = dict(num_experts=8, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                  drop_tokens=False)
    centred = TopKRouter(MoEConfig(router_input_centering="causal", **fields), 16)
    plain = TopKRouter(MoEConfig(**fields), 16)
    plain.weight.data.copy_(centred.weight.data)
    got, ref = centred(x, num_sequences=3), plain(want.float(), num_sequences=3)
    assert torch.equal(got.expert_TK, ref.expert_TK)
    assert torch.allclose(got.gates_TK, ref.gates_TK, atol=1e-6)
    assert "input_mean" not in centred.state_dict()  # no state: training, evaluation and generation agree


def test_input_whitening_against_a_float64_loop():
    """--moe-router-input-whitening-momentum 0.5 (issue 28): over three training forwards the router's moving
    covariance equals a float64 loop (per token: x_t minus the mean of its sequence's earlier tokens, RMS 1; the
    covariance; Sigma = cov at the first forward, then 0.5 Sigma + 0.5 cov) to 1e-12 (float64 on both sides, same
    order of reductions up to summation order), and each forward routes like a plain causal router fed x @ W_ref,
    W_ref = Sigma^-1/2 of the EARLIER forwards (eigenvalues floored at 1e-3 x the largest; identity at the first):
    same experts, gates to 1e-5 (fp32 x @ W on anisotropic inputs). Evaluation forwards leave the state alone."""
    from moe.config import MoEConfig
    from moe.gating import TopKRouter

    torch.manual_seed(0)
    fields = dict(num_experts=8, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                  drop_tokens=False, router_input_centering="causal")
    whitened = TopKRouter(MoEConfig(router_input_whitening=0.5, **fields), 16)
    plain = TopKRouter(MoEConfig(**fields), 16)
    plain.weight.data.copy_(whitened.weight.data)
    sigma, w_ref = None, torch.eye(16, dtype=torch.float64)
    mix = torch.randn(16, 16) * torch.logspace(0, 1.5, 16)  # a few dominant directions
    for step in range(3):
        x = (torch.randn(3 * 24, 16) @ mix + 4.0 * torch.randn(16)).requires_grad_()
        got = whitened(x, num_sequences=3)
        ref = plain((x.detach().double() @ w_ref).float(), num_sequences=3)
        assert torch.equal(got.expert_TK, ref.expert_TK), step
        assert torch.allclose(got.gates_TK, ref.gates_TK, atol=1e-5), step
        c = _brute_causal_centered(x.detach().double(), 3)
        cov = c.T @ c / c.shape[0]
        sigma = cov if sigma is None else 0.5 * sigma + 0.5 * cov
        assert torch.allclose(whitened.input_cov, sigma, rtol=0, atol=1e-12), step
        ev, vec = torch.linalg.eigh(sigma)
        w_ref = (vec * ev.clamp(min=1e-3 * float(ev.max())).rsqrt()) @ vec.T
        assert torch.allclose(whitened.input_whiten, w_ref, atol=1e-9), step
    with torch.no_grad():
        whitened(torch.randn(24, 16), num_sequences=1)  # no gradient: not folded in
    assert float(whitened.input_cov_count) == 3 and torch.allclose(whitened.input_cov, sigma, atol=1e-12)
    assert {"input_cov", "input_cov_count", "input_whiten"} <= set(whitened.state_dict())
    assert "input_cov" not in plain.state_dict()  # default off: no new state


def _routing_per_position(model, tokens):
    """{router index: (expert_TK, gates_TK) as [B, S, K]} of one training-mode forward."""
    from moe.gating import routers

    got, hooks = {}, []
    for i, r in enumerate(routers(model)):
        hooks.append(r.register_forward_hook(
            lambda mod, args, out, i=i: got.__setitem__(i, (out.expert_TK.view(*tokens.shape, -1),
                                                           out.gates_TK.detach().view(*tokens.shape, -1)))))
    model(tokens, labels=tokens)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("centering", ["causal", "batch"])
def test_causal_centring_routes_without_later_tokens(centering):
    """The leak check: in training mode, a token's routing (experts and gates) is unchanged when every LATER token
    of the micro-batch changes, with --moe-router-center-input causal; with 'batch' (the micro-batch mean) the
    earlier tokens' gates move, so the check can fail. Causal attention keeps earlier positions' hidden states
    bitwise equal; the gates get atol 1e-6 for a different summation order in the cumulative sums."""
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from moe.config import MoEConfig

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16,
                      max_position_embeddings=16, padded_vocab_size=64, normalization="RMSNorm",
                      position_embedding_type="rope", activation="swiglu", hidden_dropout=0.0, attention_dropout=0.0)
    moe = MoEConfig(num_experts=4, topk=2, router_family="megatron", score_function="sigmoid", expert_bias=True,
                    drop_tokens=False, router_input_centering=centering)
    model = GPTModel(cfg, moe).train()
    tokens = torch.randint(0, 64, (2, 16))
    cut = 9
    changed = tokens.clone()
    changed[:, cut:] = torch.randint(0, 64, (2, 16 - cut))
    a, b = _routing_per_position(model, tokens), _routing_per_position(model, changed)
    assert a.keys() == b.keys() and len(a) == 1
    (ea, ga), (eb, gb) = a[0], b[0]
    same = torch.equal(ea[:, :cut], eb[:, :cut]) and torch.allclose(ga[:, :cut], gb[:, :cut], atol=1e-6)
    assert same == (centering == "causal")
    assert not torch.equal(ga[:, cut:], gb[:, cut:])  # the later tokens did change


def test_generation_with_causal_centring_recomputes_the_window():
    """The KV cache does not keep the earlier tokens' router inputs: generation drops it for such a model, so a
    cached and an uncached call sample the same tokens."""
    from megatron.config import ModelConfig
    from megatron.inference import generate, routes_on_earlier_tokens
    from megatron.model import GPTModel
    from moe.config import MoEConfig

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=32,
                      max_position_embeddings=32, padded_vocab_size=64)
    moe = MoEConfig(num_experts=4, topk=2, router_family="megatron", score_function="sigmoid", drop_tokens=False,
                    router_input_centering="causal")
    model = GPTModel(cfg, moe).eval()
    assert routes_on_earlier_tokens(model) and not routes_on_earlier_tokens(GPTModel(cfg, None))
    kw = dict(max_new_tokens=8, temperature=1.0, seed=3)
    assert generate(model, [1, 2, 3], use_cache=True, **kw) == generate(model, [1, 2, 3], use_cache=False, **kw)


def test_bare_center_input_flag_keeps_batch_centring():
    """The bare flag keeps its old meaning (batch); 'causal' is the value the demo gives; off by default."""
    import argparse

    from megatron.arguments import add_moe_router_args

    p = argparse.ArgumentParser()
    add_moe_router_args(p)
    assert p.parse_args(["--moe-router-center-input"]).moe_router_center_input == "batch"
    assert p.parse_args(["--moe-router-center-input", "causal"]).moe_router_center_input == "causal"
    assert p.parse_args([]).moe_router_center_input is False


@pytest.mark.parametrize("split", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                   ["--context-parallel-size", "2"]])
def test_causal_centring_is_refused_when_sequences_are_split(split):
    """A rank holding a chunk of each sequence lacks the earlier chunks' tokens: one ConfigError naming both flags."""
    from megatron.arguments import parse_args, train_config_from_args, validate_sequence_context_parallel
    from megatron.errors import ConfigError

    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "10", "--num-experts", "4", "--moe-router-center-input", "causal", *split]
    cfg = train_config_from_args(parse_args(argv), 128, dp_size=1)
    with pytest.raises(ConfigError, match=r"--moe-router-center-input causal is not supported"):
        validate_sequence_context_parallel(cfg)


def test_whitening_refresh_is_refused_with_pipeline_parallelism():
    """The refresh forward runs the whole model on one rank: with PP one ConfigError naming the flag."""
    from megatron.arguments import parse_args, train_config_from_args, validate_sequence_context_parallel
    from megatron.errors import ConfigError

    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--train-iters", "10", "--num-experts", "4", "--moe-router-center-input", "causal",
            "--moe-router-input-whitening-momentum", "0.3", "--moe-router-input-whitening-refresh",
            "--pipeline-model-parallel-size", "2"]
    cfg = train_config_from_args(parse_args(argv), 128, dp_size=1)
    with pytest.raises(ConfigError, match=r"^--moe-router-input-whitening-refresh with --pipeline-model-parallel"):
        validate_sequence_context_parallel(cfg)


WHITENED = ["--num-experts", "4", "--moe-router-center-input", "causal", "--moe-router-input-whitening-momentum", "0.3",
            "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--hidden-dropout", "0",
            "--attention-dropout", "0"]


def _whitening_state(model):
    from moe.gating import routers
    return [(r.input_cov.clone(), r.input_cov_count.clone(), r.input_whiten.clone()) for r in routers(model)]


def test_whitening_refresh_folds_in_like_a_training_forward(tiny_corpus, tmp_path):
    """--moe-router-input-whitening-refresh (issue 28): refresh_whitening's no-gradient forward leaves router k's
    covariance, count and W exactly as a training forward on the same tokens does in a copy of the model whose
    routers before k already hold their refreshed W (each refreshed router routes with its new W, so the deeper ones
    see the inputs of the next step); it does not count the tokens for the expert bias (a training forward does)
    and does not run the layers after the last router (no logits). Two MoE layers."""
    import copy

    from megatron.training import setup_from_argv, train_step
    from moe.gating import refresh_whitening, routers

    st, train_iter, _, _ = setup_from_argv(tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", *WHITENED,
                                                           "--expert-interval", "1"))
    try:
        train_step(st, train_iter)  # W is no longer the identity
        tokens = next(train_iter)["text"][:, :-1].contiguous()
        before = copy.deepcopy(st.model)
        ended = []
        hook = st.model.register_forward_hook(lambda *_: ended.append(1))  # the whole forward's end
        assert refresh_whitening(st.model, lambda: st.model(tokens))
        hook.remove()
        assert ended == []  # stopped after the last router
        got = _whitening_state(st.model)
        assert len(got) == 2
        for k in range(len(got)):
            ref = copy.deepcopy(before)
            for r_ref, (c, n, w) in zip(routers(ref)[:k], got[:k]):
                r_ref.input_cov.copy_(c), r_ref.input_cov_count.copy_(n), r_ref.input_whiten.copy_(w)
            ref(tokens)  # a training forward (gradients on)
            c, n, w = _whitening_state(ref)[k]
            assert torch.equal(got[k][1], n) and torch.equal(got[k][0], c) and torch.equal(got[k][2], w), k
            assert all(float(r.local_tokens_per_expert.sum()) > 0 for r in routers(ref))  # training forwards count
        assert all(float(r.local_tokens_per_expert.sum()) == 0 for r in routers(st.model))  # the refresh does not
    finally:
        st.resources.close()


@pytest.mark.parametrize("refresh", [False, True])
def test_train_step_refreshes_the_whitening_after_the_step(tiny_corpus, tmp_path, refresh):
    """A training step of 2 micro-batches folds 2 covariances into each whitened router, 3 with the refresh flag
    (the last micro-batch again, at the new parameters); the flag needs the whitening and is refused with PP."""
    from megatron.training import setup_from_argv, train_step
    from moe.config import MoEConfig
    from moe.gating import routers

    argv = tiny_train_argv(tiny_corpus, tmp_path, "--train-iters", "4", *WHITENED,
                           *(["--moe-router-input-whitening-refresh"] if refresh else []))
    st, train_iter, _, _ = setup_from_argv(argv)
    try:
        assert st.num_micro_batches == 2
        for step in (1, 2):
            train_step(st, train_iter)
            assert [int(r.input_cov_count) for r in routers(st.model)] == [step * (3 if refresh else 2)]
    finally:
        st.resources.close()
    with pytest.raises(ValueError, match="needs --moe-router-input-whitening-momentum"):
        MoEConfig(num_experts=4, router_input_centering="causal", router_input_whitening_refresh=True)
