"""The lm-evaluation-harness model `megatron_moe`: a checkpoint of this project behind lm_eval 0.4's `LM` interface.

Importing this module registers the model with lm_eval's registry, so the Python API works:

    import lm_eval, megatron.eval.harness
    lm_eval.simple_evaluate(model="megatron_moe", model_args="load=CKPT,batch_size=16", tasks=["lambada_openai"])

and `python -m megatron.eval.harness --model megatron_moe --model_args load=CKPT,batch_size=16 --tasks piqa ...` runs
lm_eval's own command line, unchanged, with every one of its flags (lm_eval 0.4 has no plugin entry points: this
module registers the model, then calls the harness's `cli_evaluate`).

model_args (all optional but `load`):
    load: checkpoint root or iter_XXXXXXX directory, any tensor-parallel size (merged in memory), dense or MoE.
    batch_size: requests per forward (default 16; results do not depend on it). A `batch_size` here wins over
        the harness's --batch_size (whose default, 1, cannot be told from an explicit 1); "auto" means 16.
    dropless: true (default) = dropless MoE routing, batch-independent; false = token dropping at the eval capacity.
    eval_capacity_factor: token dropping at this capacity factor (implies dropless=false).
    dtype: fp32 (default), bf16 or fp16 (forward under autocast; log-softmax stays fp32).
    device: cpu, cuda, cuda:1 (default: the harness's --device, whose default cuda falls back to the CPU when
        there is no GPU, else cuda when available).
    max_length: model window in tokens (default: the checkpoint's --seq-length).
    moe_offload: nvme (the store in moe_offload_dir, alias moe_expert_store: the CLIs' --moe-offload nvme
        --moe-offload-dir DIR), or an expert-store directory itself: experts stay on disk and are read through a
        cache (moe/offload); moe_expert_cache_bytes sets the cache (default 25%).
    max_gen_toks: default generation budget (256, as the harness's HF model); seed: sampling seed (1234);
    pad_multiple: scorer row padding (16); vocab_file, merge_file, tokenizer_model: tokenizer file overrides.
    add_bos_token: as the harness's hf model: a Hugging Face tokenizer encodes with its post-processor (e.g. Llama's
        BOS) unless false; the prefix token is its BOS when it has one (HarnessEncoding).

The three request types (what the harness asks, and how it is answered):
    loglikelihood(context, continuation): the project's LoglikelihoodScorer (megatron/eval/scorer.py), which
        follows the harness's encoding and truncation rules, so numbers equal tools/eval_zeroshot.py's exactly.
    loglikelihood_rolling(text): the harness's disjoint rolling windows (lm_eval.utils.get_rolling_token_windows
        + make_disjoint_window, prefix = end-of-document token), scored as loglikelihood requests and summed.
    generate_until(context, gen_kwargs): megatron.inference.generate_until (KV cache; greedy, or sampled with
        do_sample/temperature/top_k/top_p), stop sequences as the harness's HF model applies them.
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional, Tuple

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from megatron.errors import ConfigError
from megatron.eval.scorer import LoglikelihoodScorer, Request, encode_pair
from megatron.inference import (generate_until, load_model_for_inference, model_window, moe_eval_overrides,
                                moe_routing_record)

logger = logging.getLogger(__name__)
MODEL_NAME = "megatron_moe"
_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _batch_size(value) -> int:
    """The harness passes --batch_size as a string ("16", "auto", "auto:4"); model_args pass an int."""
    if isinstance(value, str) and value.startswith("auto"):
        logger.info("batch_size=%s: no automatic search here; using 16", value)
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size ({value!r}) must be a positive integer or auto") from None
    if size < 1:
        raise ConfigError(f"batch_size ({size}) must be >= 1")
    return size


class HarnessEncoding:
    """The tokenizer as lm-evaluation-harness's `hf` model encodes for a causal model (lm_eval 0.4.13, HFLM.tok_encode
    and prefix_token_id): a Hugging Face tokenizer encodes as transformers does, special-token strings in the text
    becoming their ids and with its post-processor (the default add_special_tokens=True: Llama-style tokenizers put
    BOS before every context and rolling window) unless add_bos_token=False or the text already starts with the
    prefix token's text; the prefix token (empty contexts,
    rolling windows) is BOS when the tokenizer has one, else the end-of-document token. Other tokenizers (GPT-2 BPE,
    SentencePiece) are unchanged: no special tokens, prefix = EOD. Everything else (eod: generation still stops at
    the end-of-document token, as the harness's eot_token_id) goes to the tokenizer."""

    def __init__(self, tokenizer, add_bos_token: Optional[bool] = None):
        self._tok = tokenizer
        self.hf = hasattr(tokenizer, "tokenize_like_transformers")
        self.special = self.hf and add_bos_token is not False
        bos = getattr(tokenizer, "bos", None) if self.hf else None
        self.prefix = bos if bos is not None else tokenizer.eod  # the harness's prefix_token_id
        self._prefix_text = tokenizer.detokenize([self.prefix]) if self.hf else None

    def tokenize(self, text: str) -> List[int]:
        if not self.hf:
            return self._tok.tokenize(text)
        return self._tok.tokenize_like_transformers(text, self.special and not text.startswith(self._prefix_text))

    def tokenize_plain(self, text: str) -> List[int]:
        return self._tok.tokenize_like_transformers(text, False) if self.hf else self._tok.tokenize(text)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class MegatronMoELM(LM):
    """lm_eval LM over a megatron-moe checkpoint (see the module docstring for model_args)."""

    def __init__(self, load: str, batch_size=16, dropless: Optional[bool] = None,
                 eval_capacity_factor: Optional[float] = None, dtype: str = "fp32", device: Optional[str] = None,
                 max_length: Optional[int] = None, moe_offload: Optional[str] = None,
                 moe_expert_cache_bytes: str = "25%", moe_offload_dir: Optional[str] = None,
                 moe_expert_store: Optional[str] = None, max_gen_toks: int = 256, seed: int = 1234,
                 pad_multiple: int = 16, vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                 tokenizer_model: Optional[str] = None, max_batch_size=None, add_bos_token=None, **unused):
        super().__init__()
        if unused:
            logger.warning("megatron_moe: ignoring model_args %s", ", ".join(sorted(unused)))
        if str(dtype) not in _DTYPES:
            raise ConfigError(f"dtype ({dtype}) must be one of {', '.join(_DTYPES)}")
        if dropless is True and eval_capacity_factor is not None:
            raise ConfigError("eval_capacity_factor asks for token dropping; drop dropless=true")
        self.token_dropping = dropless is False or eval_capacity_factor is not None
        self.batch_size = _batch_size(batch_size)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={device}: this torch build has no CUDA device; use device=cpu")
        self.autocast_dtype = _DTYPES[str(dtype)]
        self.dtype_name = str(dtype)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        offload = None
        store_dir = moe_offload_dir or moe_expert_store
        if str(moe_offload) in ("nvme", "none", "None", "") or moe_offload is None:
            if str(moe_offload) == "nvme" and not store_dir:
                raise ConfigError("moe_offload=nvme needs moe_offload_dir=DIR (the expert store)")
            moe_offload = store_dir if str(moe_offload) == "nvme" else None
        elif store_dir:
            raise ConfigError(f"moe_offload={moe_offload} names the store itself; drop moe_offload_dir or pass "
                              f"moe_offload=nvme")
        if moe_offload:
            from moe.offload import OffloadConfig

            offload = OffloadConfig(mode="nvme", directory=str(moe_offload), cache_bytes=str(moe_expert_cache_bytes))
        self.model, self.tokenizer, _ = load_model_for_inference(
            str(load), device=self._device, offload=offload,
            tokenizer_overrides={"vocab_file": vocab_file, "merge_file": merge_file,
                                 "tokenizer_model": tokenizer_model},
            moe_overrides=moe_eval_overrides(self.token_dropping, eval_capacity_factor))
        self.encoding = HarnessEncoding(self.tokenizer, None if add_bos_token is None else
                                        str(add_bos_token).lower() in ("true", "1"))
        self.load = str(load)
        self.window = int(max_length or self.model.cfg.seq_length)
        if self.model.position_embeddings is not None and self.window > model_window(self.model):
            raise ConfigError(f"max_length ({self.window}) must be <= the checkpoint's --max-position-embeddings "
                              f"({model_window(self.model)})")
        self.scorer = LoglikelihoodScorer(self.model, self.window, self.batch_size, int(pad_multiple),
                                          autocast_dtype=self.autocast_dtype)

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "MegatronMoELM":
        """model_args win over the harness's own settings (batch_size, device) when both name one."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "MegatronMoELM":
        """As create_from_arg_string, for model_args already parsed (the harness's CLI passes a dict)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            # the harness's --device defaults to cuda; its HF model falls back to the CPU too
            logger.info("--device %s: CUDA is not available, using the CPU", extra.pop("device"))
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        encoded = [encode_pair(self.encoding, *req.args[:2]) for req in requests]
        return [(a.loglikelihood, a.is_greedy) for a in self._score(encoded, disable_tqdm, "loglikelihood")]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows: List[Request] = []
        owner: List[int] = []
        for i, req in enumerate(requests):
            tokens = self.encoding.tokenize(req.args[0])
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.encoding.prefix, max_seq_len=self.window, context_len=1)):
                windows.append(Request(tuple(ctx), tuple(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, answer in zip(owner, self._score(windows, disable_tqdm, "loglikelihood_rolling")):
            totals[i] += answer.loglikelihood
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        gen = torch.Generator(device=self._device).manual_seed(self.seed)
        bar = self._bar(len(requests), disable_tqdm, "generate_until")
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], req.args[1]
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            with self._autocast():
                text = generate_until(self.model, self.encoding, context, until, int(kw["max_gen_toks"]),
                                      temperature=temperature, top_k=int(kw.get("top_k") or 0),
                                      top_p=float(kw.get("top_p") or 1.0), generator=gen)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out

    def get_model_info(self) -> dict:
        """Recorded in the harness's results JSON (results["config"]): checkpoint, routing, precision, batch."""
        return {"megatron_moe": {"checkpoint": self.load, "moe": moe_routing_record(self.model),
                                 "dtype": self.dtype_name, "window": self.window, "batch_size": self.batch_size,
                                 "device": str(self._device)}}

    # ------------------------------------------------------------------------------------------ helpers
    def _score(self, requests: List[Request], disable_tqdm: bool, what: str):
        bar = self._bar(len(requests), disable_tqdm, what)
        answers = self.scorer.score(requests, progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        return answers

    def _bar(self, total: int, disable: bool, what: str):
        if disable or total == 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f"megatron_moe {what}", unit="req", dynamic_ncols=True, leave=False)

    def _autocast(self):
        import contextlib

        return (torch.autocast(self._device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                else contextlib.nullcontext())


def local_task_configs(out_dir, data_dir=None) -> str:
    """The harness's own lambada_openai and piqa task configs, pointed at this project's local data files.

    Writes `lambada_openai_local.yaml` and `piqa_local.yaml` (each the installed lm_eval yaml with dataset_path
    json and data_files set; the PIQA questions and labels are joined into one jsonl with a `label` field, as the
    harness's dataset has them) into `out_dir`; returns `out_dir` for --include_path / TaskManager(include_path).
    Offline machines evaluate the same documents the harness would download. Files are hash-checked first.
    """
    import json
    import os
    from pathlib import Path

    import lm_eval.tasks as lm_tasks
    import yaml

    from megatron.data.data_files import resolve
    from megatron.eval.tasks import build_task

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lambada = resolve("lambada", data_dir)
    piqa_task = build_task("piqa")
    docs = piqa_task.load_docs({n: resolve(n, data_dir) for n in piqa_task.data_files})
    piqa = out / "piqa_valid_with_labels.jsonl"
    with open(piqa, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"goal": d["goal"], "sol1": d["choices"][0], "sol2": d["choices"][1],
                                "label": d["gold"]}) + "\n")
    installed = Path(os.path.dirname(lm_tasks.__file__))
    for src, name, split, path in (("lambada/lambada_openai.yaml", "lambada_openai_local", "test", lambada),
                                   ("piqa/piqa.yaml", "piqa_local", "validation", piqa)):
        cfg = yaml.safe_load((installed / src).read_text())  # these two configs hold no !function tags
        cfg.pop("tag", None)
        cfg.pop("training_split", None)
        cfg.update(task=name, dataset_path="json", dataset_name=None,
                   dataset_kwargs={"data_files": {split: str(path)}})
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


if __name__ != "__main__":  # run as `python -m`, main() imports this module under its own name, which registers
    register_model(MODEL_NAME)(MegatronMoELM)


def main() -> None:
    """lm_eval's command line with `megatron_moe` registered: every flag of `lm_eval` (or `lm_eval run`) works."""
    import megatron.eval.harness  # noqa: F401  (registers the model under the package's name)
    from lm_eval.__main__ import cli_evaluate

    from megatron.errors import UserError

    sys.argv[0] = "python -m megatron.eval.harness"
    torch.set_grad_enabled(False)
    try:
        cli_evaluate()
    except UserError as e:  # a bad model_arg, checkpoint or data file: one line, as the project's CLIs do
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
