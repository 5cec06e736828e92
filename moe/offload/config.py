"""`OffloadConfig` (NVMe expert offload at inference), `OptimizerOffloadConfig` (expert Adam state on NVMe in
training, and its mapping from a DeepSpeed config), and byte-size parsing for their flags."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from moe.offload.store import OffloadError

OFFLOAD_MODES = ("none", "nvme")
PREFETCH_MODES = ("gate", "none")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_bytes(spec: str, flag: str, total: Optional[int] = None) -> int:
    """'2GB', '512MiB', '1e9' or, when `total` is given, '25%' of it -> bytes; ValueError naming `flag`."""
    text = str(spec).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*(%|[A-Za-z]*)", text)
    if m is None or (m.group(2) != "%" and m.group(2).upper() not in _UNITS):
        raise ValueError(f"{flag} ({spec!r}) must be a byte size such as 2GB, 512MiB or 1e9"
                         + (", or a percentage of all expert bytes such as 25%" if total is not None else ""))
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if total is None:
            raise ValueError(f"{flag} ({spec!r}): a percentage is not allowed here; give a byte size")
        if not 0 < value <= 100:
            raise ValueError(f"{flag} ({spec!r}) must be a percentage in (0, 100]")
        return int(total * value / 100)
    return int(value * _UNITS[unit.upper()])


@dataclass(frozen=True)
class OffloadConfig:
    """Where a MoE model's experts live at inference and how they are brought in."""

    mode: str = "none"  # --moe-offload: 'none' (experts in memory) or 'nvme' (experts in files, cached)
    directory: Optional[str] = None  # --moe-expert-store: the expert store (written from the checkpoint if empty)
    cache_bytes: str = "25%"  # --moe-expert-cache-bytes: byte size or percentage of all expert bytes
    prefetch: str = "gate"  # --moe-prefetch: 'gate' (next layer's router on the current hidden state) or 'none'
    num_readers: int = 2  # --moe-offload-readers: reader threads, one aio handle each
    verify: bool = True  # check each record's checksum after every read (xxh3, ~25 GB/s)
    activation_bytes: str = "1GiB"  # --moe-offload-activation-bytes: activations of one layer-major block
    layer_major: bool = True  # offline scoring runs blocks of micro-batches layer by layer

    def __post_init__(self):
        if self.mode not in OFFLOAD_MODES:
            raise ValueError(f"--moe-offload ({self.mode!r}) must be one of {', '.join(OFFLOAD_MODES)}")
        if self.prefetch not in PREFETCH_MODES:
            raise ValueError(f"--moe-prefetch ({self.prefetch!r}) must be one of {', '.join(PREFETCH_MODES)}")
        if self.mode == "nvme" and not self.directory:
            raise ValueError("--moe-offload nvme needs --moe-expert-store (a directory on the NVMe disk)")
        if self.num_readers < 1:
            raise ValueError(f"--moe-offload-readers ({self.num_readers}) must be >= 1")
        parse_bytes(self.cache_bytes, "--moe-expert-cache-bytes", total=1)
        if parse_bytes(self.activation_bytes, "--moe-offload-activation-bytes") < 1:
            raise ValueError(f"--moe-offload-activation-bytes ({self.activation_bytes}) must be positive")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


OPTIMIZER_OFFLOAD_MODES = ("none", "nvme")


@dataclass(frozen=True)
class OptimizerOffloadConfig:
    """Where the Adam state of expert parameters lives in training, and how it is swapped (moe.offload.swap)."""

    mode: str = "none"  # --moe-offload-optimizer: 'none' (in memory) or 'nvme' (records in --moe-offload-dir)
    directory: Optional[str] = None  # --moe-offload-dir: one store per rank in DIR/rank_XXXXX (scratch space)
    buffer_count: int = 4  # --moe-offload-buffer-count: page-locked record buffers (read ahead / write behind)
    pipeline: bool = True  # read expert i+1 and write i-1 while i is updated (False: read, update, write in turn)
    # with `pipeline`: the swap runs on a thread of its own after step() returns, in the order of the forward pass,
    # and the next forward waits at each MoE layer for that layer's experts only; whoever reads the weights or the
    # state otherwise calls optimizer.synchronize() first (--moe-offload-overlap; off: step() returns with every
    # update done, as torch's optimizers do)
    overlap: bool = False
    verify: bool = True  # xxh3 of every record written, checked when it is read back (~25 GB/s)
    aio_block_size: int = 1 << 20  # --moe-offload-aio-block-size: bytes per aio request
    aio_queue_depth: int = 32  # --moe-offload-aio-queue-depth: aio requests in flight per thread
    aio_single_submit: bool = False  # --moe-offload-aio-single-submit: one io_submit per request
    aio_overlap_events: bool = False  # --moe-offload-aio-overlap-events: refill the queue per completion
    aio_intra_op_parallelism: int = 1  # --moe-offload-aio-intra-op-parallelism: threads per aio request

    def __post_init__(self):
        if self.mode not in OPTIMIZER_OFFLOAD_MODES:
            raise OffloadError(f"--moe-offload-optimizer ({self.mode!r}) must be one of "
                             f"{', '.join(OPTIMIZER_OFFLOAD_MODES)}")
        if self.mode == "nvme" and not self.directory:
            raise OffloadError("--moe-offload-optimizer nvme needs --moe-offload-dir (a directory on the NVMe disk)")
        if self.buffer_count < 1:
            raise OffloadError(f"--moe-offload-buffer-count ({self.buffer_count}) must be >= 1")
        if self.aio_block_size < 4096 or self.aio_block_size % 4096:
            raise OffloadError(f"--moe-offload-aio-block-size ({self.aio_block_size}) must be a positive multiple "
                             f"of 4096")
        if self.aio_queue_depth < 1:
            raise OffloadError(f"--moe-offload-aio-queue-depth ({self.aio_queue_depth}) must be >= 1")
        if self.aio_intra_op_parallelism < 1:
            raise OffloadError(f"--moe-offload-aio-intra-op-parallelism ({self.aio_intra_op_parallelism}) must be "
                             f">= 1")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def handle_kwargs(self) -> dict:
        """The aio_handle constructor's keyword arguments (DeepNVMe names)."""
        return dict(block_size=self.aio_block_size, queue_depth=self.aio_queue_depth,
                    single_submit=self.aio_single_submit, overlap_events=self.aio_overlap_events,
                    intra_op_parallelism=self.aio_intra_op_parallelism)
