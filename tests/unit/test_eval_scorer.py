"""Batched scorer: equals a one-request-at-a-time reference, is micro-batch invariant, handles boundary cases."""
import random

import pytest
import torch
import torch.nn.functional as F

from megatron.config import ModelConfig
from megatron.eval.scorer import LoglikelihoodScorer, Request, encode_pair, model_input, score_logits
from megatron.model import GPTModel

VOCAB = 96
WINDOW = 24


def tiny_model(moe_cfg=None, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=WINDOW,
                      max_position_embeddings=WINDOW, padded_vocab_size=VOCAB, hidden_dropout=0.0,
                      attention_dropout=0.0, init_method_std=0.2)  # large init: peaked logits, some greedy hits
    return GPTModel(cfg, moe_cfg).eval()


def random_requests(n, seed=0, max_context=40):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        ctx = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, max_context)))  # some exceed the window
        cont = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 5)))
        reqs.append(Request(ctx, cont))
    return reqs


@torch.no_grad()
def with_greedy_continuations(model, reqs, every=3):
    """Every `every`-th request gets the model's own greedy 1-3 token continuation, so greedy hits occur."""
    out = []
    for i, r in enumerate(reqs):
        if i % every == 0:
            ids = list(r.context)
            for _ in range(1 + i % 3):
                ids.append(int(model(torch.tensor([ids[-WINDOW:]])).logits[0, -1].argmax()))
            r = Request(r.context, tuple(ids[len(r.context):]))
        out.append(r)
    return out


@torch.no_grad()
def brute_force(model, req, window=WINDOW):
    """The harness's recipe written out for one request: no batching, no padding, full logits, fp64 log_softmax."""
    full = list(req.context) + list(req.continuation)
    inp = full[-(window + 1):][:-1]
    logits = model(torch.tensor([inp])).logits[0]  # [len(inp), V]
    logp = F.log_softmax(logits.double(), dim=-1)
    ll, greedy = 0.0, True
    for k, tok in enumerate(req.continuation):
        pos = len(inp) - len(req.continuation) + k
        ll += float(logp[pos, tok])
        greedy &= int(logp[pos].argmax()) == tok
    return ll, greedy


def test_batched_scorer_matches_brute_force():
    model = tiny_model()
    reqs = with_greedy_continuations(model, random_requests(24))
    answers = LoglikelihoodScorer(model, WINDOW, micro_batch_size=6, pad_multiple=8).score(reqs)
    n_greedy = 0
    for req, ans in zip(reqs, answers):
        ll, greedy = brute_force(model, req)
        # fp32 logits from differently shaped GEMMs (padded batch, head on selected rows) differ in the last
        # bits; summed over <= 5 tokens that stays far below 1e-4
        assert ans.loglikelihood == pytest.approx(ll, abs=1e-4)
        assert ans.is_greedy == greedy
        n_greedy += greedy
    assert 0 < n_greedy < len(reqs)  # both outcomes exercised 


def test_results_identical_at_any_micro_batch_size():
    model = tiny_model()
    reqs = with_greedy_continuations(model, random_requests(30, seed=1))
    runs = [LoglikelihoodScorer(model, WINDOW, micro_batch_size=b).score(reqs) for b in (1, 7, 32)]
    assert runs[0] == runs[1] == runs[2]  # bitwise: every request always sees the same input shape


def test_dropless_moe_results_match_at_any_micro_batch_size():
    from moe.config import MoEConfig

    # no 2nd-expert sampling: DeepSpeed's default samples in eval too, which would make routing depend on RNG use
    model = tiny_model(MoEConfig(num_experts=4, expert_interval=2, topk=2, drop_tokens=False,
                                 second_expert_sampling=False))  # layer 2 is MoE
    reqs = random_requests(5, seed=2)  # few: a MoE forward costs ~0.1 s on CPU
    scorers = [LoglikelihoodScorer(model, WINDOW, micro_batch_size=b) for b in (1, 4)]
    assert all(s.tied_head for s in scorers)
    runs = [s.score(reqs) for s in scorers]
    for a, b in zip(runs[0], runs[1]):
        # Not bitwise: each expert's GEMM has as many rows as tokens routed to it in the micro-batch, and
        # CPU GEMMs round differently at different row counts; the gap is fp32 rounding (~1e-7 per token).
        assert a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-5) and a.is_greedy == b.is_greedy
    for i in (0, 4):
        ll, greedy = brute_force(model, reqs[i])
        assert runs[0][i].loglikelihood == pytest.approx(ll, abs=1e-4) and runs[0][i].is_greedy == greedy
    # With token dropping, capacity counts the micro-batch's tokens (padding included) and random token
    # selection draws from torch's RNG: results depend on the batch, by design. The scorer still runs and keeps
    # its fast head (its self-check reseeds both passes).
    dropping = tiny_model(MoEConfig(num_experts=4, expert_interval=2, topk=2, drop_tokens=True))
    assert LoglikelihoodScorer(dropping, WINDOW).tied_head


def test_micro_batches_group_one_padded_length_longest_first():
    scorer = LoglikelihoodScorer(tiny_model(), WINDOW, micro_batch_size=3, pad_multiple=8)
    inputs = [[0] * n for n in (3, 24, 9, 8, 16, 1, 17, 5)]
    batches = scorer.micro_batches(inputs)
    assert batches == [[1, 6], [2, 4], [0, 3, 5], [7]]  # padded lengths 24, 16, 8 (x3), 8
    assert sorted(i for b in batches for i in b) == list(range(len(inputs)))


def test_context_longer_than_window_is_truncated_from_the_left():
    req = Request(tuple(range(50)), (60, 61, 62))
    inp, cont = model_input(req, WINDOW)
    assert inp == list(range(28, 50)) + [60, 61]  # last WINDOW + 1 tokens, minus the final one
    assert len(inp) == WINDOW and cont == [60, 61, 62]
    model = tiny_model()
    (ans,) = LoglikelihoodScorer(model, WINDOW).score([req])
    ll, greedy = brute_force(model, req)
    assert ans.loglikelihood == pytest.approx(ll, abs=1e-4) and ans.is_greedy == greedy
    # a continuation longer than the window keeps its last WINDOW tokens, all predicted inside the kept window
    long = Request((1, 2), tuple(range(3, 3 + WINDOW + 5)))
    inp, cont = model_input(long, WINDOW)
    assert inp == list(range(3 + 4, 3 + WINDOW + 4)) and cont == list(range(3 + 5, 3 + WINDOW + 5))
    (ans,) = LoglikelihoodScorer(model, WINDOW).score([long])
    ll, greedy = brute_force(model, Request(long.context + long.continuation[:5], long.continuation[5:]))
    assert ans.loglikelihood == pytest.approx(ll, abs=1e-4) and ans.is_greedy == greedy


def _harness_hf_model(window):
    """lm_eval's own `hf` backend (HFLM, lm_eval 0.4.13) around a tiny random GPT-2 of this vocabulary."""
    pytest.importorskip("accelerate", reason="lm_eval's hf backend imports accelerate (pinned in "
                                              "requirements-test.txt)")
    hf_models = pytest.importorskip("lm_eval.models.huggingface")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # only for HFLM's set-up: requests arrive as ids
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t1", pad_token="t0")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=window, n_embd=32, n_layer=2, n_head=4,
                                       initializer_range=0.2, bos_token_id=1, eos_token_id=1)).eval()
    return hf_models.HFLM(pretrained=model, tokenizer=tokenizer, max_length=window, batch_size=1, device="cpu")


def test_long_requests_equal_lm_eval_hf_backend():
    """Requests whose context + continuation exceed the window: the same input windows and the same answers as
    lm_eval's HFLM._loglikelihood_tokens; a continuation longer than the window, which the harness refuses
    (assert), equals the harness on the request whose context holds the continuation's cut-off head."""
    lm = _harness_hf_model(WINDOW)
    rng = random.Random(3)
    reqs = [Request(tuple(rng.randrange(VOCAB) for _ in range(n_ctx)), tuple(rng.randrange(VOCAB) for _ in range(n)))
            for n_ctx, n in ((40, 3), (30, WINDOW), (WINDOW + 2, 1), (5, WINDOW), (60, 7))]
    assert all(len(r.context) + len(r.continuation) > WINDOW + 1 for r in reqs)
    windows = []
    call = lm._model_call
    lm._model_call = lambda inps, **kw: (windows.append(inps[0].tolist()), call(inps, **kw))[1]
    theirs = lm._loglikelihood_tokens([(("", ""), list(r.context), list(r.continuation)) for r in reqs],
                                      disable_tqdm=True)
    # the harness runs longest first (its Collator); match its windows by content
    assert sorted(windows) == sorted(model_input(r, WINDOW)[0] for r in reqs)
    scorer = LoglikelihoodScorer(lm.model, WINDOW, micro_batch_size=1, pad_multiple=1)
    ours = scorer.score(reqs)
    for a, (ll, greedy) in zip(ours, theirs):
        # same input tensor [1, len] through the same model, fp32 log_softmax, gather and sum in both: the last
        # bits can only differ in the order of the fp32 sum, hence 1e-6 relative
        assert a.loglikelihood == pytest.approx(ll, rel=1e-6) and a.is_greedy == greedy
    long = Request((7, 8, 9), tuple(rng.randrange(VOCAB) for _ in range(WINDOW + 6)))
    with pytest.raises(AssertionError):  # lm_eval 0.4.13: assert len(continuation_enc) <= self.max_length
        lm._loglikelihood_tokens([(("", ""), list(long.context), list(long.continuation))], disable_tqdm=True)
    head, tail = long.continuation[:6], long.continuation[6:]
    ((ll, greedy),) = lm._loglikelihood_tokens([(("", ""), list(long.context + head), list(tail))], disable_tqdm=True)
    (a,) = scorer.score([long])
    assert a.loglikelihood == pytest.approx(ll, rel=1e-6) and a.is_greedy == greedy


def test_score_logits_needs_every_token_greedy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])  # argmax 0, 1, 2
    logp = F.log_softmax(logits.double(), dim=-1)
    ans = score_logits(logits, [0, 1, 2], torch.float64)
    assert ans.is_greedy and ans.loglikelihood == pytest.approx(float(logp[0, 0] + logp[1, 1] + logp[2, 2]))
    wrong_last = score_logits(logits, [0, 1, 0], torch.float64)
    assert not wrong_last.is_greedy
    assert wrong_last.loglikelihood == pytest.approx(float(logp[0, 0] + logp[1, 1] + logp[2, 0]))


class SuccessorModel(torch.nn.Module):
    """Predicts token t + 1 after token t, with a clear margin; no tied head, so the scorer uses full logits."""

    def __init__(self, vocab=VOCAB):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        class Out:
            logits = 5.0 * F.one_hot((tokens + 1) % self.vocab, self.vocab).float()  # [b, s, V]
        return Out()


def test_multi_token_continuation_greedy_through_the_batched_path():
    reqs = [Request((3, 4), (5, 6, 7)), Request((3, 4), (5, 6, 9)), Request((10,), (11,)), Request((10,), (12,))]
    answers = LoglikelihoodScorer(SuccessorModel(), WINDOW, micro_batch_size=3).score(reqs)
    assert [a.is_greedy for a in answers] == [True, False, True, False]
    p_hit = float(F.log_softmax(torch.tensor([5.0] + [0.0] * (VOCAB - 1)), 0)[0])
    p_miss = float(F.log_softmax(torch.tensor([5.0] + [0.0] * (VOCAB - 1)), 0)[1])
    assert answers[0].loglikelihood == pytest.approx(3 * p_hit, abs=1e-5)
    assert answers[1].loglikelihood == pytest.approx(2 * p_hit + p_miss, abs=1e-5)


def test_tied_head_fast_path_equals_full_logits():
    model = tiny_model()
    reqs = random_requests(12, seed=3)
    fast = LoglikelihoodScorer(model, WINDOW, micro_batch_size=4)
    assert fast.tied_head
    slow = LoglikelihoodScorer(model, WINDOW, micro_batch_size=4)
    slow.tied_head = False
    for a, b in zip(fast.score(reqs), slow.score(reqs)):
        assert a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-5) and a.is_greedy == b.is_greedy


class CharTokenizer:
    """One id per character (ord); enough to test how encode_pair splits strings."""

    eod = 0

    def tokenize(self, text):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(map(chr, ids))


def test_encode_pair_moves_trailing_whitespace_and_handles_empty_context():
    tok = CharTokenizer()
    r = encode_pair(tok, "Question: x\nAnswer: ", "yes")
    assert tok.detokenize(r.context) == "Question: x\nAnswer:" and tok.detokenize(r.continuation) == " yes"
    r = encode_pair(tok, "", "hello")
    assert r.context == (0,) and tok.detokenize(r.continuation) == "hello"


@pytest.fixture(scope="module")
def gpt2():
    from megatron.data.data_files import DataFileError, default_data_dir, resolve
    from megatron.tokenizer import build_tokenizer

    try:
        vocab, merges = resolve("gpt2-vocab", verify=False), resolve("gpt2-merges", verify=False)
    except DataFileError as e:
        pytest.skip(f"GPT-2 BPE files not found under {default_data_dir()} ({e}); run tools/download_data.py")
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))


def test_encode_pair_gpt2_leading_space_and_multi_token_word(gpt2):
    # The space belongs to the continuation's first BPE token ("Ġword"), so joint and separate encoding agree.
    r = encode_pair(gpt2, "He opened the door and saw the", " antidisestablishmentarianism")
    assert len(r.continuation) > 1
    assert gpt2.detokenize(r.continuation) == " antidisestablishmentarianism"
    assert list(r.continuation) == gpt2.tokenize(" antidisestablishmentarianism")
    assert gpt2.detokenize(r.context) == "He opened the door and saw the"
    # A trailing space on the context moves to the continuation instead of becoming a lone "Ġ" token.
    r2 = encode_pair(gpt2, "He opened the door and saw the ", "cat")
    assert r2 == encode_pair(gpt2, "He opened the door and saw the", " cat")
    assert gpt2.detokenize(r2.continuation) == " cat"
