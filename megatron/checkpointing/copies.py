"""How the checkpoint code copies tensors: on one intra-op thread (many small memcpys)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_intra_op_thread():
    """Checkpoint copies (snapshot, expert slices in and out, stacking) are many ~1 MB memcpys: torch's intra-op
    parallel region costs more than the copy itself when the cores are busy (measured on the shared 2-core machine:
    1 MB copies at 0.1-0.4 GB/s with 2 threads, 1.7-2.3 GB/s with 1), and one thread already saturates memory
    bandwidth for a copy. The training thread is inside the save or load meanwhile and no checkpoint write is in
    flight (a second save waits for the first), so nothing else is slowed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
