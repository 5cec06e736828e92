"""Runs zero-shot tasks on a checkpoint: data checks, model loading, scoring, aggregation, JSON and markdown output.

Order of a run (`run_zeroshot`), so that every user mistake is reported before minutes of work:
1. build the tasks (unknown name -> ValueError naming --tasks);
2. check the sha256 of every data file the tasks read (DataFileError naming the file and tools/download_data.py);
3. load the checkpoint (CheckpointError naming --load);
4. per task: load documents, encode requests, score them in micro-batches, aggregate metrics with stderr.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron.data.data_files import default_data_dir, resolve
from megatron.errors import ConfigError
from megatron.eval.metrics import AGGREGATIONS, perplexity_stderr
from megatron.eval.scorer import LoglikelihoodScorer
from megatron.eval.tasks import Task, build_task
from megatron.eval.tasks.base import GenerationTask

logger = logging.getLogger(__name__)
_AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EvalConfig:
    load: str  # checkpoint root or iter_XXXXXXX directory
    tasks: Tuple[str, ...] = ("lambada", "piqa")  # task names (megatron.eval.tasks registry)
    data_dir: Optional[str] = None  # root of lambada/, piqa/ (default: megatron.data.data_files.default_data_dir())
    micro_batch_size: int = 8  # requests per forward
    lambada_last_token: bool = False  # Megatron non-strict LAMBADA: score only the last BPE token
    eval_fp32: bool = False  # fp32 weights, no autocast, log_softmax in fp64
    autocast_dtype: Optional[str] = None  # "bf16" or "fp16": forward under autocast (ignored with eval_fp32)
    drop_tokens: bool = False  # MoE token dropping at the eval capacity (--moe-eval-token-dropping); False = dropless
    eval_capacity_factor: Optional[float] = None  # --moe-eval-capacity-factor (implies token dropping); None = ckpt's
    seq_length: Optional[int] = None  # model window in tokens; None = checkpoint's --seq-length
    pad_multiple: int = 16  # right-pad rows to a multiple of this many tokens
    limit: Optional[int] = None  # score only the first N documents of each task (smoke runs)
    bootstrap_iters: int = 10000  # resamples for the perplexity stderr
    seed: int = 1234  # torch seed (MoE random token selection) and bootstrap seed
    device: Optional[str] = None  # default cuda when available, else cpu
    tokenizer_overrides: Dict[str, Optional[str]] = field(default_factory=dict)  # vocab_file/merge_file/...
    progress: bool = True  # tqdm bar on stderr
    offload: Optional[object] = None  # moe.offload.OffloadConfig: experts in an NVMe expert store (None: in memory)

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size ({self.micro_batch_size}) must be >= 1")
        if self.pad_multiple < 1:
            raise ConfigError(f"--pad-to-multiple ({self.pad_multiple}) must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit ({self.limit}) must be >= 1")
        if self.seq_length is not None and self.seq_length < 1:
            raise ConfigError(f"--seq-length ({self.seq_length}) must be >= 1")
        if self.eval_capacity_factor is not None and not self.eval_capacity_factor > 0:
            raise ConfigError(f"--moe-eval-capacity-factor ({self.eval_capacity_factor}) must be > 0")
        if self.autocast_dtype not in (None, "bf16", "fp16"):
            raise ConfigError(f"autocast dtype ({self.autocast_dtype}) must be bf16, fp16 or None")
        if not self.tasks:
            raise ConfigError("--tasks is empty; give e.g. --tasks lambada,piqa")


@dataclass
class MetricResult:
    task: str
    metric: str
    value: float
    stderr: float
    num_examples: int
    seconds: float  # wall time of the whole task (encode + score + aggregate)
    variant: str = ""
    higher_is_better: bool = True


def task_options(cfg: EvalConfig) -> Dict[str, dict]:
    """Constructor options per task name (only tasks that take options appear)."""
    return {"lambada": {"last_token": cfg.lambada_last_token}}


def verify_data(tasks: Sequence[Task], data_dir) -> Dict[str, Dict[str, Path]]:
    """{task name: {data file name: verified path}}; raises DataFileError on the first missing/bad file."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    return {t.name: {f: resolve(f, data_dir) for f in t.data_files} for t in tasks}


def evaluate_task(task: Task, docs: List[dict], tokenizer, scorer, bootstrap_iters: int = 10000, seed: int = 1234,
                  progress: Optional[Callable[[int], None]] = None,
                  generator: Optional[Callable[[str, Sequence[str], int], str]] = None
                  ) -> Tuple[List[MetricResult], List[dict]]:
    """Scores every request of `docs` in one pass, then aggregates; returns (one row per metric, per-doc values).

    `scorer` is anything with `score(requests, progress) -> answers` (a LoglikelihoodScorer, or a stub in tests);
    `generator(prompt, until, max_gen_toks) -> text` answers a GenerationTask (megatron.inference.generate_until).
    """
    start = time.perf_counter()
    if isinstance(task, GenerationTask):
        if generator is None:
            raise ValueError(f"{task.name} is a generation task; evaluate_task needs a generator")
        per_doc = []
        for doc in docs:
            per_doc.append(task.score_generation(doc, generator(task.prompt(doc), task.until, task.max_gen_toks)))
            if progress is not None:
                progress(1)
    else:
        per_doc = _loglikelihood_results(task, docs, tokenizer, scorer, progress)
    seconds = time.perf_counter() - start
    rows = []
    for metric, agg_name in task.aggregations.items():
        agg, stderr = AGGREGATIONS[agg_name]
        if stderr is perplexity_stderr:
            stderr = functools.partial(perplexity_stderr, iters=bootstrap_iters, seed=seed)
        values = [d[metric] for d in per_doc]
        rows.append(MetricResult(task.name, metric, agg(values), stderr(values), len(values), seconds,
                                 task.describe(), task.higher_is_better[metric]))
    return rows, per_doc


def _loglikelihood_results(task: Task, docs: List[dict], tokenizer, scorer, progress) -> List[dict]:
    """Per-document metric values of a log-likelihood task: every document's requests scored in one call."""
    per_doc_requests = [task.encode(doc, tokenizer) for doc in docs]
    window = getattr(scorer, "window", None)
    cut = [k for k, reqs in enumerate(per_doc_requests)
           if window is not None and any(len(r.continuation) > window for r in reqs)]
    if cut:
        # scored on their last `window` tokens (megatron.eval.scorer.model_input); a longer window scores all
        logger.warning("%s: %d document(s) (first: %d) have a continuation longer than the model window (%d tokens, "
                       "--seq-length); each is scored on its last %d tokens", task.name, len(cut), cut[0], window,
                       window)
    flat = [r for reqs in per_doc_requests for r in reqs]
    answers = scorer.score(flat, progress=progress)
    per_doc, pos = [], 0
    for doc, reqs in zip(docs, per_doc_requests):
        per_doc.append(task.process_results(doc, answers[pos:pos + len(reqs)]))
        pos += len(reqs)
    return per_doc


def _load_model(cfg: EvalConfig):
    """(model in eval mode, tokenizer, recorded configs, window in tokens) for the checkpoint and overrides."""
    from megatron.inference import load_model_for_inference, moe_eval_overrides

    moe_overrides = moe_eval_overrides(cfg.drop_tokens, cfg.eval_capacity_factor)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, configs = load_model_for_inference(cfg.load, device=device,
                                                         tokenizer_overrides=cfg.tokenizer_overrides,
                                                         moe_overrides=moe_overrides, offload=cfg.offload)
    mcfg = model.cfg
    window = cfg.seq_length or mcfg.seq_length
    if mcfg.position_embedding_type == "learned_absolute" and window > mcfg.max_position_embeddings:
        raise ConfigError(f"--seq-length ({window}) must be <= the checkpoint's --max-position-embeddings "
                         f"({mcfg.max_position_embeddings})")
    if cfg.eval_fp32:
        model.float()
    return model, tokenizer, configs, window


def run_zeroshot(cfg: EvalConfig) -> dict:
    """Evaluates `cfg.tasks` on `cfg.load`; returns the JSON-ready report (see tools/eval_zeroshot.py)."""
    tasks = [build_task(name, **task_options(cfg).get(name, {})) for name in cfg.tasks]
    paths = verify_data(tasks, cfg.data_dir)
    model, tokenizer, configs, window = _load_model(cfg)
    try:
        return _run_tasks(cfg, tasks, paths, model, tokenizer, configs, window)
    finally:
        if model.offload is not None:
            model.offload.close()


def layer_major_block(cfg: EvalConfig, model, window: int) -> int:
    """Micro-batches per layer-major block: as many as the activation budget holds (1 without offload).

    Per micro-batch and token the block keeps the residual stream, the MLP input and output (3 h) and, in a
    MoE layer, k rows of the expert hidden layer and of its input and output (k (F + 2 h)), in fp32.
    """
    off = cfg.offload
    if off is None or not off.enabled or not off.layer_major:
        return 1
    from moe.offload import parse_bytes

    mcfg = model.cfg
    topk = max((layer.mlp.cfg.topk for layer in model.layers if hasattr(layer.mlp, "router")), default=1)
    per_token = 4 * (3 * mcfg.hidden_size + topk * (mcfg.ffn_hidden_size + 2 * mcfg.hidden_size))
    per_batch = per_token * cfg.micro_batch_size * window
    return max(1, parse_bytes(off.activation_bytes, "--moe-offload-activation-bytes") // per_batch)


def _run_tasks(cfg: EvalConfig, tasks, paths, model, tokenizer, configs, window) -> dict:
    autocast = None if cfg.eval_fp32 else _AUTOCAST_DTYPES[cfg.autocast_dtype]
    block = layer_major_block(cfg, model, window)
    scorer = LoglikelihoodScorer(model, window, cfg.micro_batch_size, cfg.pad_multiple,
                                 logprob_dtype=torch.float64 if cfg.eval_fp32 else torch.float32,
                                 autocast_dtype=autocast, layer_major_block=block)
    rows: List[MetricResult] = []
    timings = []
    for task in tasks:
        torch.manual_seed(cfg.seed)  # MoE random token selection draws from it: same numbers on every run
        docs = task.load_docs(paths[task.name])[:cfg.limit]
        generating = isinstance(task, GenerationTask)
        n_requests = len(docs) if generating else sum(len(task.requests(d)) for d in docs)
        bar = _progress_bar(task.name, n_requests, cfg.progress)
        task_rows, _ = evaluate_task(task, docs, tokenizer, scorer, cfg.bootstrap_iters, cfg.seed,
                                     progress=bar.update if bar is not None else None,
                                     generator=functools.partial(_generate, model, tokenizer, autocast))
        if bar is not None:
            bar.close()
        secs = task_rows[0].seconds
        timings.append({"task": task.name, "seconds": secs, "num_examples": len(docs), "num_requests": n_requests,
                        "examples_per_second": len(docs) / secs if secs > 0 else math.inf})
        logger.info("%s: %d examples in %.1f s (%.1f examples/s)", task.name, len(docs), secs, len(docs) / secs)
        rows.extend(task_rows)
    from megatron.inference import moe_routing_record

    offload = None
    if model.offload is not None:
        offload = model.offload.summary()
        offload["layer_major_block"] = block
    return {
        "offload": offload,
        "checkpoint": os.path.abspath(cfg.load),
        "results": [dataclasses.asdict(r) for r in rows],
        "timings": timings,
        "settings": {
            "window": window, "micro_batch_size": cfg.micro_batch_size, "pad_multiple": cfg.pad_multiple,
            "precision": "fp32 (fp64 log_softmax)" if cfg.eval_fp32 else (cfg.autocast_dtype or "fp32"),
            "device": str(next(model.parameters()).device), "limit": cfg.limit, "seed": cfg.seed,
            "bootstrap_iters": cfg.bootstrap_iters,
            "moe": moe_routing_record(model),  # dropless unless --moe-eval-token-dropping/-capacity-factor
            "tokenizer": type(tokenizer).__name__,
        },
    }


def _generate(model, tokenizer, autocast_dtype, prompt: str, until: Sequence[str], max_gen_toks: int) -> str:
    """Greedy answer to one generation prompt (the harness's generate_until, megatron.inference)."""
    import contextlib

    from megatron.inference import generate_until

    device = next(model.parameters()).device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        return generate_until(model, tokenizer, prompt, until, max_gen_toks)


def _progress_bar(name: str, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="req", dynamic_ncols=True, leave=False)


def markdown_table(report: dict) -> str:
    """The results as a markdown table (harness layout: Task | Metric | Value | ± | Stderr | n)."""
    lines = ["| Task | Variant | Metric | Value | | Stderr | n | seconds |",
             "|------|---------|--------|------:|---|------:|--:|--------:|"]
    for r in report["results"]:
        arrow = "↑" if r["higher_is_better"] else "↓"
        lines.append(f"| {r['task']} | {r['variant']} | {r['metric']} {arrow} | {r['value']:.4f} | ± | "
                     f"{r['stderr']:.4f} | {r['num_examples']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def write_report(report: dict, path: str, flag: str = "--output") -> None:
    """Writes `report` as JSON to `path` atomically; ConfigError naming `flag` when it cannot be written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write ({e.strerror}); give a writable path") from None
