"""Reads a DeepSpeed JSON config (`--deepspeed --deepspeed_config FILE`) onto the parsed flags: one table from JSON
key paths to argparse dests, so the rest of the project sees only flags.

Rules: a key sets its dest(s) unless the user gave that flag explicitly with a different value (then one
ConfigError names both); a key that changes nothing here is logged once (NO_EFFECT); an unknown key is a warning
naming it. Adding a key = adding one TABLE entry (path -> converter returning {dest: value}).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

from megatron.errors import ConfigError
from moe.offload.config import OPTIMIZER_OFFLOAD_MODES

Converter = Callable[[Any], Dict[str, Any]]


PREFIX = "--deepspeed_config: "  # every error and note about the JSON starts so


def json_value(where: str, value, kind: type):
    """`value` of JSON key `where` as `kind` (bool, int or float); ConfigError naming the key otherwise.

    One rule for every key (DeepSpeed's Python takes the JSON values as they are): a bool is JSON true/false only;
    an int is any whole number (2 and 2.0; not 2.5, not true); a float is any number (not true/false).
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = (isinstance(value, bool) if kind is bool else
          is_number and float(value).is_integer() if kind is int else is_number)
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"{PREFIX}{where} ({value!r}) must be {want}")
    return kind(value)


def _num(v, key) -> float:
    return json_value(key, v, float)


def _int(v, key) -> int:
    return json_value(key, v, int)


def _bool(v, key) -> bool:
    return json_value(key, v, bool)


def _to(dest: str, kind: Callable, key: str, post: Callable = lambda x: x) -> Converter:
    return lambda v: {dest: post(kind(v, key))}


def _zero_stage(v) -> Dict[str, Any]:
    stage = _int(v, "zero_optimization.stage")
    if stage not in (0, 1, 2):
        raise ConfigError(f"{PREFIX}zero_optimization.stage ({stage}) is not supported here; use 0, 1 "
                          f"(optimizer state sharded) or 2 (and gradients)")
    return {"zero_stage": stage}


def _loss_scale(v) -> Dict[str, Any]:
    scale = _num(v, "fp16.loss_scale")
    return {"loss_scale": None if scale == 0 else float(scale)}  # DeepSpeed: 0 = dynamic


def _betas(v) -> Dict[str, Any]:
    if not (isinstance(v, list) and len(v) == 2):
        raise ConfigError(f"{PREFIX}optimizer.params.betas must be [beta1, beta2], got {v!r}")
    return {"adam_beta1": float(_num(v[0], "betas[0]")), "adam_beta2": float(_num(v[1], "betas[1]"))}


def _optimizer_type(v) -> Dict[str, Any]:
    if str(v).lower() not in ("adam", "adamw"):
        raise ConfigError(f"{PREFIX}optimizer.type {v!r} is not available here; this project trains with "
                          f"AdamW (decoupled weight decay), which is DeepSpeed's Adam/AdamW: use \"Adam\" or \"AdamW\"")
    return {}


def _adam_w_mode(v) -> Dict[str, Any]:
    if not _bool(v, "optimizer.params.adam_w_mode"):
        raise ConfigError(f"{PREFIX}optimizer.params.adam_w_mode false (L2-coupled Adam) is not available "
                          "here; drop it (AdamW is the default)")
    return {}


def _steps_per_print(v) -> Dict[str, Any]:
    return {"log_interval": _int(v, "steps_per_print")}


# JSON key path -> converter. Paths of nested blocks are dotted; the optimizer/scheduler/curriculum blocks are read
# by their own functions below because their meaning depends on their "type".
TABLE: Dict[str, Converter] = {
    "train_batch_size": _to("global_batch_size", _int, "train_batch_size"),
    "train_micro_batch_size_per_gpu": _to("micro_batch_size", _int, "train_micro_batch_size_per_gpu"),
    "gradient_accumulation_steps": _to("ds_gradient_accumulation_steps", _int, "gradient_accumulation_steps"),
    "gradient_clipping": _to("clip_grad", _num, "gradient_clipping", float),
    "steps_per_print": _steps_per_print,
    "wall_clock_breakdown": _to("wall_clock_breakdown", _bool, "wall_clock_breakdown"),
    "zero_optimization.stage": _zero_stage,
    "fp16.enabled": _to("fp16", _bool, "fp16.enabled"),
    "fp16.loss_scale": _loss_scale,
    "fp16.initial_scale_power": _to("initial_loss_scale", _int, "fp16.initial_scale_power", lambda p: 2.0 ** p),
    "fp16.loss_scale_window": _to("loss_scale_window", _int, "fp16.loss_scale_window"),
    "fp16.hysteresis": _to("hysteresis", _int, "fp16.hysteresis"),
    "fp16.min_loss_scale": _to("min_loss_scale", _num, "fp16.min_loss_scale", float),
    "bf16.enabled": _to("bf16", _bool, "bf16.enabled"),
    "bfloat16.enabled": _to("bf16", _bool, "bfloat16.enabled"),  # DeepSpeed's older spelling
    "optimizer.type": _optimizer_type,
    "optimizer.params.lr": _to("lr", _num, "optimizer.params.lr", float),
    "optimizer.params.betas": _betas,
    "optimizer.params.eps": _to("adam_eps", _num, "optimizer.params.eps", float),
    "optimizer.params.weight_decay": _to("weight_decay", _num, "optimizer.params.weight_decay", float),
    "optimizer.params.max_grad_norm": _to("clip_grad", _num, "optimizer.params.max_grad_norm", float),
    "optimizer.params.adam_w_mode": _adam_w_mode,
}

# Keys accepted that change nothing here, with why (logged once each).
NO_EFFECT: Dict[str, str] = {
    "prescale_gradients": "gradients are reduced in fp32 and averaged once, so pre- or post-scaling differ only by "
                          "rounding",
    "zero_allow_untested_optimizer": "the optimizer is always AdamW",
    "zero_optimization.overlap_comm": "communication buffers are not tuned through the ds_config here",
    "zero_optimization.contiguous_gradients": "communication buffers are not tuned through the ds_config here",
    "zero_optimization.reduce_bucket_size": "communication buffers are not tuned through the ds_config here",
    "zero_optimization.allgather_bucket_size": "communication buffers are not tuned through the ds_config here",
    "zero_optimization.reduce_scatter": "ZeRO-2 always reduce-scatters here",
    "zero_optimization.allgather_partitions": "ZeRO always all-gathers the updated partitions here",
    "optimizer.params.bias_correction": "AdamW always corrects the bias",
    "optimizer.params.torch_adam": "the optimizer is always torch's AdamW",
    "optimizer.params.fused": "the optimizer is always torch's AdamW",
    "fp16.auto_cast": "fp16 always autocasts here",
}

# ---- zero_optimization.offload_optimizer and aio: expert Adam state in NVMe files (moe.offload.config)
# DeepSpeed "aio" key -> argparse dest (thread_count is DeepSpeed's older name of intra_op_parallelism)
_DS_AIO_KEYS = {"block_size": "moe_offload_aio_block_size", "queue_depth": "moe_offload_aio_queue_depth",
                "single_submit": "moe_offload_aio_single_submit", "overlap_events": "moe_offload_aio_overlap_events",
                "intra_op_parallelism": "moe_offload_aio_intra_op_parallelism",
                "thread_count": "moe_offload_aio_intra_op_parallelism"}


def offload_args_from_ds_config(zero_optimization: Optional[dict], aio: Optional[dict]) -> dict:
    """A DeepSpeed config's `zero_optimization.offload_optimizer` and `aio` blocks as pretrain_gpt.py argparse
    dests ({dest: value}; only what the blocks set), restricted here to expert parameters.

    offload_optimizer: device nvme|none -> moe_offload_optimizer, nvme_path -> moe_offload_dir, buffer_count ->
    moe_offload_buffer_count, pipeline_read/pipeline_write -> moe_offload_pipeline (on if either is on; our
    default is on when neither is given). pin_memory and fast_init are accepted and need nothing (buffers are
    always page-locked, records start as zeros). aio: block_size, queue_depth, single_submit, overlap_events,
    intra_op_parallelism (or thread_count). Raises for what has no meaning
    here: device cpu, ratio < 1, use_gds, unknown keys
    (ConfigError naming the key).
    """
    out: dict = {}
    off = (zero_optimization or {}).get("offload_optimizer")
    if off is not None:
        if not isinstance(off, dict):
            raise ConfigError(f"{PREFIX}zero_optimization.offload_optimizer must be an object, got {off!r}")
        known = {"device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write",
                 "fast_init", "ratio"}
        unknown = sorted(set(off) - known)
        if unknown:
            raise ConfigError(f"{PREFIX}zero_optimization.offload_optimizer: unknown key(s) {unknown}; known: "
                               f"{sorted(known)}")
        device = str(off.get("device", "none")).lower()
        if device == "cpu":
            raise ConfigError(f'{PREFIX}zero_optimization.offload_optimizer.device "cpu" is not supported (expert Adam state '
                               'already lives in host memory without offload); use "nvme" or "none"')
        if device not in OPTIMIZER_OFFLOAD_MODES:
            raise ConfigError(f"{PREFIX}zero_optimization.offload_optimizer.device ({device!r}) must be nvme or none")
        out["moe_offload_optimizer"] = device
        if "nvme_path" in off:
            if not isinstance(off["nvme_path"], str):
                raise ConfigError(f"{PREFIX}zero_optimization.offload_optimizer.nvme_path must be a directory path (a string), "
                                   f"got {off['nvme_path']!r}")
            out["moe_offload_dir"] = off["nvme_path"]
        if device == "nvme" and not off.get("nvme_path"):
            raise ConfigError(f'{PREFIX}zero_optimization.offload_optimizer.device "nvme" needs "nvme_path" (a directory '
                               'on the NVMe disk)')
        if "buffer_count" in off:
            out["moe_offload_buffer_count"] = json_value("zero_optimization.offload_optimizer.buffer_count",
                                                     off["buffer_count"], int)
        if "pipeline_read" in off or "pipeline_write" in off:
            out["moe_offload_pipeline"] = any([json_value(f"zero_optimization.offload_optimizer.{k}", off[k], bool)
                                               for k in ("pipeline_read", "pipeline_write") if k in off])
        if json_value("zero_optimization.offload_optimizer.ratio", off.get("ratio", 1.0), float) != 1.0:
            raise ConfigError(f"{PREFIX}zero_optimization.offload_optimizer.ratio ({off['ratio']}) must be 1.0: partial "
                               f"optimizer offload is not supported (all expert state is offloaded)")
    if aio:
        if not isinstance(aio, dict):
            raise ConfigError(f"{PREFIX}aio must be an object, got {aio!r}")
        unknown = sorted(set(aio) - set(_DS_AIO_KEYS) - {"use_gds"})
        if unknown:
            raise ConfigError(f"{PREFIX}aio: unknown key(s) {unknown}; known: {sorted(_DS_AIO_KEYS)}")
        if aio.get("use_gds"):
            raise ConfigError(f"{PREFIX}aio.use_gds is not supported (GPUDirect Storage); set it to false")
        for key, dest in _DS_AIO_KEYS.items():
            if key in aio:
                value = aio[key]
                out[dest] = json_value(f"aio.{key}", value, bool if key in ("single_submit", "overlap_events") else int)
    return out


OFFLOAD_READER: Optional[Callable[[dict, dict], Dict[str, Any]]] = offload_args_from_ds_config
OFFLOAD_KEYS = ("zero_optimization.offload_optimizer", "zero_optimization.offload_param", "aio")
# scheduler "type" -> reader(block) -> {dest: value}: WarmupLR/WarmupDecayLR onto Megatron's styles, LRRangeTest and
# OneCycle onto their own flags (`scheduler_args_from_ds_config`).
SCHEDULER_READERS: Dict[str, Callable[[dict], Dict[str, Any]]] = {}


def _warmup_common(block: dict, type_: str) -> Dict[str, Any]:
    p = block.get("params", {})
    if p.get("warmup_type", "log") != "linear" or p.get("warmup_min_lr", 0) != 0:
        raise ConfigError(f"{PREFIX}scheduler {type_} with warmup_type {p.get('warmup_type', 'log')!r} and "
                          f"warmup_min_lr {p.get('warmup_min_lr', 0)} has no Megatron equivalent; use \"warmup_type\": "
                          f"\"linear\" and \"warmup_min_lr\": 0 (Megatron warms up linearly from 0), or drop the block "
                          f"and use --lr-warmup-iters")
    out = {"lr_warmup_iters": _int(p.get("warmup_num_steps", 1000), "scheduler.params.warmup_num_steps")}
    if "warmup_max_lr" in p:
        out["lr"] = float(_num(p["warmup_max_lr"], "scheduler.params.warmup_max_lr"))
    return out


def _warmup_lr(block: dict) -> Dict[str, Any]:
    """WarmupLR: linear warmup from 0 to warmup_max_lr, then constant = Megatron's constant style."""
    return {**_warmup_common(block, "WarmupLR"), "lr_decay_style": "constant"}


def _warmup_decay_lr(block: dict) -> Dict[str, Any]:
    """WarmupDecayLR: linear warmup, then linear decay to warmup_min_lr (0) at total_num_steps = Megatron's linear
    style with --lr-decay-iters total_num_steps and --min-lr 0."""
    p = block.get("params", {})
    if "total_num_steps" not in p:
        raise ConfigError(f"{PREFIX}scheduler WarmupDecayLR needs params.total_num_steps")
    return {**_warmup_common(block, "WarmupDecayLR"), "lr_decay_style": "linear", "min_lr": 0.0,
            "lr_decay_iters": _int(p["total_num_steps"], "scheduler.params.total_num_steps")}


# DeepSpeed JSON `scheduler.params` key -> this CLI's argparse dest, per scheduler type
_DS_SCHEDULER_PARAMS = {
    "LRRangeTest": {"lr_range_test_min_lr": ("lr_range_test_min_lr", float),
                    "lr_range_test_step_size": ("lr_range_test_step_size", int),
                    "lr_range_test_step_rate": ("lr_range_test_step_rate", float),
                    "lr_range_test_staircase": ("lr_range_test_staircase", bool)},
    "OneCycle": {"cycle_min_lr": ("cycle_min_lr", float), "cycle_max_lr": ("cycle_max_lr", float),
                 "cycle_first_step_size": ("cycle_first_step_size", int),
                 "cycle_second_step_size": ("cycle_second_step_size", int),
                 "cycle_first_stair_count": ("cycle_first_stair_count", int),
                 "cycle_second_stair_count": ("cycle_second_stair_count", int),
                 "decay_step_size": ("decay_step_size", int), "decay_lr_rate": ("decay_lr_rate", float),
                 "cycle_momentum": ("cycle_momentum", bool), "cycle_min_mom": ("cycle_min_mom", float),
                 "cycle_max_mom": ("cycle_max_mom", float), "decay_mom_rate": ("decay_mom_rate", float)},
}
_DS_SCHEDULER_STYLE = {"LRRangeTest": "lr-range-test", "OneCycle": "one-cycle"}


def scheduler_args_from_ds_config(block: dict) -> dict:
    """A DeepSpeed config's `scheduler` block {"type": "LRRangeTest" | "OneCycle", "params": {...}} -> {argparse dest:
    value} for this CLI (lr_decay_style plus one dest per given param), to be set on the parsed args.

    Raises ConfigError (one line naming the key) for another scheduler type, an unknown param or a value of the
    wrong type. WarmupLR / WarmupDecayLR / WarmupCosineLR are not mapped: use --lr-warmup-iters with
    --lr-decay-style constant / linear / cosine.
    """
    if not isinstance(block, dict) or "type" not in block:
        raise ConfigError(f"{PREFIX}scheduler ({block!r}) must be an object with a \"type\"")
    kind = block["type"]
    if kind not in _DS_SCHEDULER_PARAMS:
        raise ConfigError(f"{PREFIX}scheduler.type ({kind!r}) is not supported; use LRRangeTest or OneCycle, "
                          f"or Megatron's --lr-warmup-iters with --lr-decay-style constant/linear/cosine")
    params = block.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{PREFIX}scheduler.params ({params!r}) must be an object")
    out = {"lr_decay_style": _DS_SCHEDULER_STYLE[kind]}
    known = _DS_SCHEDULER_PARAMS[kind]
    for key, value in params.items():
        if key not in known:
            raise ConfigError(f"{PREFIX}scheduler.params.{key} is not a {kind} parameter; known: "
                              f"{', '.join(sorted(known))}")
        dest, kind_of = known[key]
        out[dest] = json_value(f"scheduler.params.{key}", value, kind_of)
    return out


SCHEDULER_READERS.update({"WarmupLR": _warmup_lr, "WarmupDecayLR": _warmup_decay_lr,
                          "LRRangeTest": scheduler_args_from_ds_config, "OneCycle": scheduler_args_from_ds_config})
_SCHEDULER_PARAMS = {"WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
                     "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                                       "total_num_steps", "last_batch_iteration"}}


def _curriculum(block: dict, notes: List[str]) -> Dict[str, Any]:
    """curriculum_learning -> dest `curriculum_learning`: a dict of CurriculumConfig fields, or None when disabled."""
    if not block.get("enabled", False):
        return {"curriculum_learning": None}
    if block.get("curriculum_type", "seqlen") != "seqlen":
        raise ConfigError(f"{PREFIX}curriculum_learning.curriculum_type {block['curriculum_type']!r} is "
                          f"not available here; only \"seqlen\"")
    for k in ("min_difficulty", "max_difficulty", "schedule_type"):
        if k not in block:
            raise ConfigError(f"{PREFIX}curriculum_learning needs {k}")
    sc = block.get("schedule_config", {})
    known = {"enabled", "curriculum_type", "min_difficulty", "max_difficulty", "schedule_type", "schedule_config"}
    notes += [f"--deepspeed_config: unknown key curriculum_learning.{k} ignored" for k in block if k not in known]
    known_sc = {"total_curriculum_step", "difficulty_step", "root_degree", "difficulty", "max_step"}
    notes += [f"--deepspeed_config: unknown key curriculum_learning.schedule_config.{k} ignored"
              for k in sc if k not in known_sc]
    return {"curriculum_learning": {
        "min_difficulty": _int(block["min_difficulty"], "curriculum_learning.min_difficulty"),
        "max_difficulty": _int(block["max_difficulty"], "curriculum_learning.max_difficulty"),
        "schedule_type": block["schedule_type"],
        "total_curriculum_step": sc.get("total_curriculum_step"),
        "difficulty_step": sc.get("difficulty_step", 8),
        "root_degree": sc.get("root_degree", 1),
        "difficulty": tuple(sc.get("difficulty", ())),
        "max_step": tuple(sc.get("max_step", ())),
    }}


def _flatten(obj: dict, prefix: str = "") -> List[Tuple[str, Any]]:
    out = []
    for k, v in obj.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and path not in TABLE:
            out += _flatten(v, path + ".") if v else [(path, v)]
        else:
            out.append((path, v))
    return out


def read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError(f"--deepspeed_config {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                          f"a template placeholder (e.g. ZERO_STAGE) left unsubstituted?") from None


def dest_values(cfg: dict) -> Tuple[List[Tuple[str, str, Any]], List[str]]:
    """([(json key, dest, value)], notes): what `cfg` sets, and the log lines (no-effect keys, unknown keys)."""
    sets: List[Tuple[str, str, Any]] = []
    notes: List[str] = []

    def add(key, mapping):
        sets.extend((key, d, v) for d, v in mapping.items())

    blocks = {k: cfg.get(k) for k in ("optimizer", "scheduler", "curriculum_learning")}
    if isinstance(blocks["scheduler"], dict):
        typ = blocks["scheduler"].get("type")
        if typ in SCHEDULER_READERS:
            add("scheduler", SCHEDULER_READERS[typ](blocks["scheduler"]))
            allowed = _SCHEDULER_PARAMS.get(typ)
            if allowed is not None:
                notes += [f"--deepspeed_config: unknown key scheduler.params.{k} ignored"
                          for k in blocks["scheduler"].get("params", {}) if k not in allowed]
        else:
            notes.append(f"--deepspeed_config: scheduler type {typ!r} is not supported here (WarmupLR, WarmupDecayLR); "
                         f"the block is ignored and the --lr-* flags set the schedule")
    if isinstance(blocks["curriculum_learning"], dict):
        add("curriculum_learning", _curriculum(blocks["curriculum_learning"], notes))
    offload = {k: v for k, v in _flatten(cfg) if k.startswith(OFFLOAD_KEYS)}
    if offload and OFFLOAD_READER is not None:
        add("zero_optimization.offload_optimizer", OFFLOAD_READER(cfg.get("zero_optimization", {}), cfg.get("aio", {})))
    for key, value in _flatten({k: v for k, v in cfg.items() if k not in ("scheduler", "curriculum_learning")}):
        if key in TABLE:
            add(key, TABLE[key](value))
        elif key in NO_EFFECT:
            notes.append(f"--deepspeed_config: {key} = {json.dumps(value)} accepted; it changes nothing here "
                         f"({NO_EFFECT[key]})")
        elif key.startswith(OFFLOAD_KEYS):
            if OFFLOAD_READER is None or key.startswith("zero_optimization.offload_param"):
                # parameter offload (ZeRO-3) does not exist here; optimizer offload is read by OFFLOAD_READER
                notes.append(f"--deepspeed_config: {key} is not supported here (only offload_optimizer of expert "
                             f"parameters); ignored")
        else:
            notes.append(f"--deepspeed_config: unknown key {key} ignored")
    return sets, notes


def apply(args, path: str, explicit: Dict[str, str]) -> List[str]:
    """Sets `args` from the JSON at `path`; `explicit` maps the dests given on the command line to their flag.
    Returns the log lines. A value that differs from an explicit flag (or from another key for the same dest) is a
    ConfigError naming both."""
    sets, notes = dest_values(read(path))
    set_by: Dict[str, Tuple[str, Any]] = {}
    for key, dest, value in sets:
        if dest in explicit and not _same(getattr(args, dest), value):
            raise ConfigError(f"--deepspeed_config {path}: {key} = {_show(value)} conflicts with {explicit[dest]} "
                              f"{_show(getattr(args, dest))} on the command line; make them agree or drop one")
        if dest in set_by and not _same(set_by[dest][1], value):
            raise ConfigError(f"--deepspeed_config {path}: {key} = {_show(value)} conflicts with {set_by[dest][0]} = "
                              f"{_show(set_by[dest][1])}; make them agree")
        set_by[dest] = (key, value)
        setattr(args, dest, value)
    return notes


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (bool, type(None))) else str(v)
