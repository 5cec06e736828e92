"""Dispatch-level audits that prove CUDA behaviour on a CPU machine: which dtype each GEMM runs in, which ops
would make the host wait for the GPU, and how many aten ops a piece of code dispatches.

CPU is not CUDA: a CPU `.item()` costs nothing, CPU autocast has no LayerNorm rule, and every op is "synchronous".
What is the same on both devices is the stream of aten ops the Python code dispatches; this module records that
stream with a `TorchDispatchMode`, so a test on CPU can assert what the same code does on a GPU:

- GEMMs (`mm`, `addmm`, `bmm`, `baddbmm`, `_grouped_mm`, attention kernels, their `out=`/in-place forms) with the
  dtypes of their tensor inputs;
- ops that synchronise the host with the device on CUDA: `_local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`),
  `nonzero`/`argwhere`, `masked_select`, boolean-mask `index`/`index_put_`, `unique*`, `bincount` (its output
  size is the data's maximum), `repeat_interleave` without `output_size`, `lift_fresh` (a tensor made from host
  data, i.e. a host->device copy of a Python list or scalar), and `Tensor.tolist()` (patched while auditing, since
  on CPU it reads memory without dispatching);
- a count of every aten op (the kernel-launch count on a GPU, up to fusion).

Device<->host copies of real tensors cannot be told apart on a CPU-only run (every tensor is on the CPU); a run on
the `meta` device catches those (a `.cpu()`/`.item()` of a meta tensor fails), which is why audits pair the two.
"""
from __future__ import annotations

import collections
import os
import traceback
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

GEMM_OPS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm", "_grouped_mm", "matmul", "linear",
                      "_scaled_mm", "_scaled_dot_product_flash_attention",
                      "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention", "_flash_attention_forward",
                      "_efficient_attention_forward", "_scaled_dot_product_flash_attention_backward",
                      "_scaled_dot_product_flash_attention_for_cpu_backward",
                      "_scaled_dot_product_efficient_attention_backward", "_flash_attention_backward",
                      "_efficient_attention_backward"})

# Ops whose output size, or whose result, must reach the host before the next launch on CUDA.
_ALWAYS_SYNC = frozenset({"_local_scalar_dense", "nonzero", "argwhere", "masked_select", "unique", "_unique",
                          "_unique2", "unique_dim", "unique_consecutive", "bincount", "lift_fresh",
                          "lift_fresh_copy"})


class GemmCall(NamedTuple):
    op: str
    dtypes: Tuple[torch.dtype, ...]
    site: str


class SyncCall(NamedTuple):
    op: str
    site: str


_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                      for d in ("megatron", "moe", "tools"))
_THIS_FILE = os.path.abspath(__file__)


def _site() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _THIS_FILE and path.startswith(_PROJECT_DIRS):
            rel = os.path.relpath(path, os.path.dirname(os.path.dirname(_THIS_FILE)))
            return f"{rel}:{frame.lineno} in {frame.name}"
    return "<outside the project>"


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _is_sync(name: str, func, args, kwargs) -> bool:
    if name in _ALWAYS_SYNC:
        return True
    if name == "repeat_interleave":  # Tensor repeats: the output size is their sum unless output_size is given
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"):
        return _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    return False


class DispatchAudit(TorchDispatchMode):
    """Records every aten op dispatched inside the `with` block.

    Attributes after the block: `ops` (Counter of op names), `gemms` (list of GemmCall), `syncs` (list of
    SyncCall). `record_sites=False` skips the stack walk (faster, sites read "?").
    """

    def __init__(self, record_sites: bool = True):
        super().__init__()
        self.record_sites = record_sites
        self.ops: collections.Counter = collections.Counter()
        self.gemms: List[GemmCall] = []
        self.syncs: List[SyncCall] = []
        self._tolist = None

    def __enter__(self):
        audit = self
        original = torch.Tensor.tolist
        self._tolist = original

        def tolist(t, *a, **k):
            audit.syncs.append(SyncCall("tolist", _site() if audit.record_sites else "?"))
            audit.ops["tolist"] += 1
            return original(t, *a, **k)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in GEMM_OPS:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            if name == "_grouped_mm":
                dtypes = dtypes[:2]
            self.gemms.append(GemmCall(name, dtypes, _site() if self.record_sites else "?"))
        if _is_sync(name, func, args, kwargs):
            self.syncs.append(SyncCall(name, _site() if self.record_sites else "?"))
        return func(*args, **kwargs)

    # -- summaries -------------------------------------------------------------------------------------------
    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    def gemm_dtypes(self) -> Dict[str, collections.Counter]:
        """{site: Counter(dtype of the GEMM's first operand)}, the view a dtype assertion usually wants."""
        out: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for g in self.gemms:
            out[g.site][g.dtypes[0] if g.dtypes else None] += 1
        return dict(out)

    def sync_sites(self) -> collections.Counter:
        return collections.Counter(f"{s.op} @ {s.site}" for s in self.syncs)

    def report(self, top: Optional[int] = 15) -> str:
        lines = [f"{self.total_ops} aten ops, {len(self.gemms)} GEMMs, {len(self.syncs)} host syncs"]
        for site, n in self.sync_sites().most_common():
            lines.append(f"  sync x{n}: {site}")
        for op, n in self.ops.most_common(top):
            lines.append(f"  {op}: {n}")
        return "\n".join(lines)


# CUDA autocast's fp32 list (torch/csrc/autograd/autocast_mode / aten/src/ATen/autocast_mode.cpp) includes the
# normalisations; CPU autocast's does not, so on CPU a bf16 autocast region feeds bf16 into the next layer where
# CUDA feeds fp32. `cuda_autocast_rules` makes CPU autocast produce what CUDA produces for these ops.
_FP32_ON_CUDA = ("layer_norm", "group_norm", "rms_norm")


class cuda_autocast_rules:
    """`with cuda_autocast_rules(torch.bfloat16):` = CPU autocast in `dtype`, plus CUDA's rule that the
    normalisations in `torch.nn.functional` run, and return, in fp32. Use it where a test must see the input
    dtypes a CUDA run would give the next layer (e.g. an fp32 input to every MoE layer under --bf16)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self._saved = {}
        self._autocast = None

    def __enter__(self):
        import torch.nn.functional as F
        for name in _FP32_ON_CUDA:
            original = getattr(F, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def fp32(*args, __original=original, **kwargs):
                if torch.is_autocast_enabled("cpu"):
                    args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                 for a in args)
                    kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                              for k, v in kwargs.items()}
                    with torch.autocast("cpu", enabled=False):
                        return __original(*args, **kwargs)
                return __original(*args, **kwargs)

            setattr(F, name, fp32)
        self._autocast = torch.autocast("cpu", dtype=self.dtype)
        self._autocast.__enter__()
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F
        self._autocast.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(F, name, original)
        self._saved = {}
        return False
