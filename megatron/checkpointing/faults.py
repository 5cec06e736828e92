"""Crash-consistency fault points for tools/fault_inject.py (MEGATRON_FAULT_INJECT); unset, they do nothing."""
from __future__ import annotations

import os
import signal

FAULT_ENV = "MEGATRON_FAULT_INJECT"  # "write:N" or "tracker" (see fault_point)
_writes = 0


def fault_point(where: str, f=None) -> None:
    """MEGATRON_FAULT_INJECT=write:N: this process SIGKILLs itself during its N-th checkpoint file write, leaving half
    the bytes on disk (a torn file; with --async-save the write runs on the save thread, so the kill lands while
    training goes on); =tracker: between writing the new tracker and renaming it over the old one."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    global _writes
    if where == "write":
        _writes += 1
        if spec != f"write:{_writes}":
            return
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
    if where == "write" or spec == where:
        os.kill(os.getpid(), signal.SIGKILL)
