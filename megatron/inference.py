"""Inference helpers: rebuild a model and tokenizer from a checkpoint, and sample with a KV cache."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import logging

import torch

from megatron.checkpointing import build_model_from_checkpoint
from megatron.errors import CheckpointError, ConfigError
from megatron.model import GPTModel

logger = logging.getLogger(__name__)


def load_model_for_inference(load: str, device=None, tokenizer_overrides: Optional[dict] = None,
                             moe_overrides: Optional[dict] = None, offload=None) -> Tuple[GPTModel, object, dict]:
    """Builds the architecture recorded in the checkpoint, loads its weights, returns (model, tokenizer, configs).

    A checkpoint saved with tensor parallelism is merged in memory (megatron/checkpointing/tp_shards.py). Dropout is
    disabled (eval mode). `tokenizer_overrides` (vocab_file, merge_file, tokenizer_model) replace the
    recorded paths; `moe_overrides` replace MoEConfig fields (e.g. drop_tokens=False for dropless evaluation).
    `offload` (moe.offload.OffloadConfig, mode 'nvme') keeps the experts in an expert store and reads them through
    a cache (megatron/offload.py); its OffloadRuntime (statistics, close()) is then `model.offload`.
    """
    from megatron.tokenizer import build_tokenizer

    build = None
    if offload is not None and offload.enabled:
        from megatron.offload import offloaded_builder

        build = offloaded_builder(offload)
    loaded = build_model_from_checkpoint(load, device, moe_overrides=moe_overrides, build=build)
    model, configs, ckpt_dir = loaded.model, loaded.configs, loaded.ckpt_dir
    model.offload = loaded.runtime
    tcfg = dict(configs.get("tokenizer") or {})
    tcfg.update({k: v for k, v in (tokenizer_overrides or {}).items() if v is not None})
    if not tcfg.get("tokenizer_type"):
        raise CheckpointError(f"{ckpt_dir}: no tokenizer recorded; pass --tokenizer-type and files")
    tokenizer = build_tokenizer(tcfg["tokenizer_type"], vocab_file=tcfg.get("vocab_file"),
                                merge_file=tcfg.get("merge_file"), tokenizer_model=tcfg.get("tokenizer_model"))
    return model, tokenizer, configs


def moe_eval_overrides(token_dropping: bool = False, capacity_factor: Optional[float] = None) -> dict:
    """MoEConfig overrides for evaluation and generation: dropless routing unless asked otherwise.

    With token dropping, an expert's capacity counts every token of the forward (DESIGN.md §3), so a request's
    numbers change with the other requests batched beside it; dropless routing makes them batch-independent
    (what the DeepSpeed-MoE tutorial recommends for evaluation). A capacity factor implies token dropping.
    """
    if capacity_factor is not None and not capacity_factor > 0:
        raise ConfigError(f"--moe-eval-capacity-factor ({capacity_factor}) must be > 0")
    dropping = token_dropping or capacity_factor is not None
    # Deterministic routing too: DeepSpeed's defaults draw random numbers in eval (Gumbel noise for a top-2 router's
    # second expert; RTS drop priority for top-1), which would make a score change from one run to the next. The
    # second expert is the router's second choice and drops (when asked for) go by the routers' own order.
    out = {"drop_tokens": dropping, "second_expert_sampling": False, "rts_scope": "train"}
    if capacity_factor is not None:
        out["eval_capacity_factor"] = capacity_factor
    return out


def moe_routing_record(model: GPTModel) -> Optional[dict]:
    """How the model's MoE layers route at evaluation, for results files (None for a dense model)."""
    cfgs = [layer.mlp.cfg for layer in model.layers if hasattr(layer.mlp, "router")]
    if not cfgs:
        return None
    cfg = cfgs[0]
    return {"routing": "capacity (token dropping)" if cfg.drop_tokens else "dropless",
            "drop_tokens": cfg.drop_tokens,
            "eval_capacity_factor": cfg.eval_capacity_factor if cfg.drop_tokens else None}


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [b, V] -> next token ids [b]; greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop tokens once the mass before them already exceeds top_p (the first token is always kept)
        remove = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def model_window(model: GPTModel) -> int:
    """Most positions the model can attend over: the learned position table, or --seq-length with RoPE."""
    return model.cfg.max_position_embeddings if model.position_embeddings is not None else model.cfg.seq_length


def routes_on_earlier_tokens(model) -> bool:
    """Whether a router centres its input on the earlier tokens' (--moe-router-center-input causal): the KV cache
    does not keep those inputs, so generation recomputes the whole window at each step instead."""
    from moe.gating import routers

    return any(r.cfg.router_input_centering == "causal" for r in routers(model))


@torch.no_grad()
def generate(model: GPTModel, prompt_ids: List[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eod: Optional[int] = None,
             use_cache: bool = True, progress: bool = False, stop: Optional[Callable[[List[int]], bool]] = None,
             generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None) -> List[int]:
    """Autoregressive sampling with a KV cache; stops at `eod`, when `stop(new ids so far)` is true, or at the
    model's window (tqdm bar with `progress`). `generator` (else one seeded with `seed`) draws the samples.
    `vocab_size` (the tokenizer's): the padded rows of the output layer (--make-vocab-size-divisible-by x TP) are
    not tokens and are never drawn."""
    if not prompt_ids:
        raise ConfigError("--prompt encodes to no tokens; give a non-empty prompt")
    device = next(model.parameters()).device
    window = model.cfg.max_position_embeddings if model.position_embeddings is not None else 1 << 30
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids[-window:])
    use_cache = use_cache and not routes_on_earlier_tokens(model)
    cache = model.new_kv_cache() if use_cache else None
    x = torch.tensor([ids], device=device)
    out: List[int] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", dynamic_ncols=True, leave=False)
    for _ in range(max_new_tokens):
        if bar is not None:
            bar.update(1)
        if len(ids) >= window:
            break
        logits = model(x, kv_cache=cache).logits[:, -1]
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        nxt = int(sample_next(logits, temperature, top_k, top_p, gen)[0])
        out.append(nxt)
        ids.append(nxt)
        if eod is not None and nxt == eod:
            break
        if stop is not None and stop(out):
            break
        x = torch.tensor([[nxt]], device=device) if use_cache else torch.tensor([ids], device=device)
    if bar is not None:
        bar.close()
    return out


def generate_until(model: GPTModel, tokenizer, context: str, until: Sequence[str], max_gen_toks: int,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   generator: Optional[torch.Generator] = None) -> str:
    """One lm-evaluation-harness `generate_until` request, answered as its HF model answers it (greedy when
    temperature == 0):

    1. the context is encoded and left-truncated to window - max_gen_toks tokens (room for the answer; a budget
       of a whole window or more, which the harness refuses, is cut to half the window with a warning);
    2. tokens are generated with the KV cache until the end-of-document token, `max_gen_toks` tokens, or until the
       decoded continuation contains one of `until` (the end-of-document string is always a stop sequence);
    3. the text is cut before the first occurrence of any stop sequence (the harness's postprocessing).
    """
    window = model_window(model)
    if max_gen_toks >= window:  # the harness's HF model refuses this; short-window models still get answers
        logger.warning("max_gen_toks (%d) >= the model window (%d tokens): generating at most %d tokens",
                       max_gen_toks, window, window // 2)
        max_gen_toks = window // 2
    eos = tokenizer.detokenize([tokenizer.eod])
    stops = [u for u in list(until) + ([eos] if eos not in until else []) if u]
    ids = tokenizer.tokenize(context)[-(window - max_gen_toks):] or [tokenizer.eod]
    new = generate(model, ids, max_gen_toks, temperature, top_k, top_p, eod=tokenizer.eod,
                   stop=lambda out: any(u in tokenizer.detokenize(out) for u in stops), generator=generator)
    # decoded alone, as the harness's HF model does (tok_decode(cont_toks)): a SentencePiece answer loses its first
    # space there too, and the tasks strip answers; tools/generate.py, which prints prompt + text, cuts instead
    text = tokenizer.detokenize([t for t in new if t != tokenizer.eod])
    for u in stops:
        text = text.split(u)[0]
    return text
