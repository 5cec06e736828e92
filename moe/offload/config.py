"""`OffloadConfig`: the settings of NVMe expert offload at inference, and byte-size parsing for its flags."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

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
    directory: Optional[str] = None  # --moe-offload-dir: the expert store (written from the checkpoint if empty)
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
            raise ValueError("--moe-offload nvme needs --moe-offload-dir (a directory on the NVMe disk)")
        if self.num_readers < 1:
            raise ValueError(f"--moe-offload-readers ({self.num_readers}) must be >= 1")
        parse_bytes(self.cache_bytes, "--moe-expert-cache-bytes", total=1)
        if parse_bytes(self.activation_bytes, "--moe-offload-activation-bytes") < 1:
            raise ValueError(f"--moe-offload-activation-bytes ({self.activation_bytes}) must be positive")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"
