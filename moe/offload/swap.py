"""The swap pipeline of a mutable expert store: each record read into one of `buffer_count` page-locked buffers,
updated in place by the caller, and written back, with the next records' reads and the previous records' writes
in flight while one is updated (DeepSpeed's pipeline_read / pipeline_write, on a reader and a writer thread
with one aio handle each); or, without pipelining, read, update, write one record at a time.

The store knows records, this file knows buffers and order; what an update does (an optimizer step) is the
caller's. Exposed swap time is what the calling thread spends waiting for I/O: the part not hidden behind updates.

On a GPU (`pin_cuda`) the buffers are also registered with CUDA (cudaHostRegister, as DeepSpeed's accelerator pins
its aio buffers): mlock alone keeps pages resident but CUDA does not know them, so a "non_blocking" copy from them is
a staged, synchronous pageable copy. An update may then queue its device work and return a fence (anything with
`synchronize()`, e.g. a CUDA event recorded after its copy back into the buffer): the writer waits on the fence
before writing the buffer, so the updating thread never waits for the device.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from moe.offload.store import ExpertStore, OffloadError, tensor_views

Key = Tuple[int, int]  # (MoE layer, global expert)
Update = Callable[[Key, Dict[str, torch.Tensor]], Optional[object]]  # may return a fence: .synchronize()


def cuda_host_register(buf: torch.Tensor) -> Callable[[], None]:
    """Registers `buf`'s (page-locked) host memory with CUDA so that copies between it and a GPU are asynchronous
    DMA; returns the function that unregisters it (call it before the memory is freed)."""
    cudart = torch.cuda.cudart()
    ptr, nbytes = buf.data_ptr(), buf.numel() * buf.element_size()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)  # cudaHostRegisterDefault
    if int(getattr(err, "value", err)) != 0:
        raise OffloadError(f"cudaHostRegister of the {nbytes}-byte swap buffers failed ({err}); lower "
                           f"--moe-offload-buffer-count or check the locked-memory limit (ulimit -l)")
    return lambda: cudart.cudaHostUnregister(ptr)


def _wait(fence) -> None:
    """Waits on an update's fence: a returned object with synchronize() (a torch.cuda.Event); other return values
    (None, or whatever an in-place op returned) are no fence."""
    synchronize = getattr(fence, "synchronize", None)
    if callable(synchronize):
        synchronize()


@dataclass
class SwapStats:
    """Counters since the last `take()`: bytes moved, time the I/O threads were busy, time the caller waited."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_s: float = 0.0  # summed duration of record reads (reader thread)
    write_s: float = 0.0  # summed duration of record writes (writer thread)
    exposed_s: float = 0.0  # caller time blocked on I/O (waiting for a read, or for the last writes)
    stall_s: float = 0.0  # training-thread time blocked on a swap running behind it (overlap: the next forward)
    total_s: float = 0.0  # wall time of the swapped steps (reads + updates + writes)
    steps: int = 0

    def take(self) -> "SwapStats":
        out = SwapStats(**vars(self))
        self.__init__()
        return out

    def summary(self) -> str:
        gbps = lambda b, s: f"{b / s / 1e9:.2f} GB/s" if s > 0 else "n/a"  # noqa: E731
        n = max(self.steps, 1)
        return (f"offload: read {self.bytes_read / n / 1e6:.1f} MB ({gbps(self.bytes_read, self.read_s)}), wrote "
                f"{self.bytes_written / n / 1e6:.1f} MB ({gbps(self.bytes_written, self.write_s)}) per step | swap "
                f"exposed {1000 * self.exposed_s / n:.1f} ms of {1000 * self.total_s / n:.1f} ms per step, training "
                f"waited {1000 * self.stall_s / n:.1f} ms")


class StateSwapper:
    """Runs an update over records of a mutable store through `buffer_count` page-locked buffers.

    Args:
        store: a mutable ExpertStore (moe.offload.store.create_store).
        buffer_count: record-sized page-locked buffers; resident bytes are buffer_count x store.record_bytes.
        handle_kwargs: aio_handle settings (block_size, queue_depth, single_submit, overlap_events,
            intra_op_parallelism); the reader and the writer each get a handle.
        pipeline: overlap reads and writes with updates (else read, update, write in turn on the calling thread).
        verify: check each read against the xxh3 of what was written.
        pin_cuda: also register the buffers with CUDA (the caller updates records on a GPU); call close() after.
    """

    def __init__(self, store: ExpertStore, buffer_count: int, handle_kwargs: dict, pipeline: bool = True,
                 verify: bool = True, pin_cuda: bool = False):
        aio = self.load_aio()
        self.store, self.pipeline, self.verify = store, pipeline, verify
        self.read_handle = aio.aio_handle(**handle_kwargs)
        self.write_handle = aio.aio_handle(**handle_kwargs)
        n, rb = max(1, min(buffer_count, len(store.records))), max(store.record_bytes, 1)
        whole = self.read_handle.new_cpu_locked_tensor(n * rb, torch.empty(0, dtype=torch.uint8))
        self.buffers: List[torch.Tensor] = [whole[i * rb:(i + 1) * rb] for i in range(n)]
        self._unregister = cuda_host_register(whole) if pin_cuda else None
        self._whole = whole  # the registration names its address: the memory lives until close()
        self.stats = SwapStats()

    def close(self) -> None:
        """Unregisters the buffers from CUDA (pin_cuda); a no-op otherwise or when called again."""
        if self._unregister is not None:
            self._unregister()
            self._unregister = None

    @staticmethod
    def load_aio():
        """The native aio op (csrc/aio), or OffloadError saying why it cannot be loaded."""
        from moe.ops.op_builder import AsyncIOBuilder

        try:
            return AsyncIOBuilder().load()
        except RuntimeError as e:
            raise OffloadError(f"--moe-offload-optimizer nvme needs the native aio op: {e}") from None

    @property
    def resident_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def run(self, keys: Sequence[Key], update: Update) -> None:
        """update(key, {name: tensor view}) for each key in order, on this thread; each record is read before its
        update and written back after it. Every write has completed when this returns. Raises the first
        OffloadError of a read or write (the remaining records are not updated)."""
        if not keys:
            return
        t0 = time.perf_counter()
        try:
            (self._pipelined if self.pipeline and len(self.buffers) > 1 else self._serial)(list(keys), update)
        finally:
            self.stats.total_s += time.perf_counter() - t0
            self.stats.steps += 1

    def read(self, key: Key) -> Dict[str, torch.Tensor]:
        """A copy of record `key`'s tensors (checkpoint saving; not counted in the per-step stats)."""
        buf = self.buffers[0]
        self._read(key, buf, count=False)
        return {n: t.clone() for n, t in tensor_views(buf, self.store.records[key]).items()}

    def write(self, key: Key, tensors: Dict[str, torch.Tensor]) -> None:
        """Writes record `key` from `tensors` (every tensor of the record, by name; checkpoint loading; not counted in
        the per-step stats)."""
        buf = self.buffers[0]
        rec = self.store.records[key]
        buf[:rec.nbytes].zero_()
        views = tensor_views(buf, rec)
        for name, view in views.items():
            view.copy_(tensors[name])
        self._write(key, buf, count=False)

    # ------------------------------------------------------------------------------------------ internals
    def _read(self, key: Key, buf: torch.Tensor, count: bool = True) -> None:
        t = time.perf_counter()
        rec = self.store.read_into(self.read_handle, key, buf, self.verify)
        if count:
            self.stats.read_s += time.perf_counter() - t
            self.stats.bytes_read += rec.nbytes

    def _write(self, key: Key, buf: torch.Tensor, count: bool = True) -> None:
        t = time.perf_counter()
        rec = self.store.write_from(self.write_handle, key, buf, self.verify)
        if count:
            self.stats.write_s += time.perf_counter() - t
            self.stats.bytes_written += rec.nbytes

    def _serial(self, keys: List[Key], update: Update) -> None:
        buf = self.buffers[0]
        for key in keys:
            t = time.perf_counter()
            self._read(key, buf)
            self.stats.exposed_s += time.perf_counter() - t
            fence = update(key, tensor_views(buf, self.store.records[key]))
            t = time.perf_counter()
            _wait(fence)
            self._write(key, buf)
            self.stats.exposed_s += time.perf_counter() - t

    def _pipelined(self, keys: List[Key], update: Update) -> None:
        """1. the reader takes a free buffer and reads the next record into it (up to buffer_count - 1 ahead);
        2. this thread updates each record as its read lands, and hands the buffer (and the update's fence) to the
           writer;
        3. the writer waits on the fence, writes the record back and frees the buffer for the reader.
        An error on either thread stops both and is raised here after they have finished."""
        free: "queue.Queue" = queue.Queue()
        ready: "queue.Queue" = queue.Queue()
        to_write: "queue.Queue" = queue.Queue()
        for b in self.buffers:
            free.put(b)
        errors: List[BaseException] = []
        stop = threading.Event()

        def reader():
            for key in keys:
                buf = free.get()
                if buf is None or stop.is_set():
                    return
                try:
                    self._read(key, buf)
                except BaseException as e:  # noqa: BLE001 - handed to the updating thread
                    ready.put((key, None, e))
                    return
                ready.put((key, buf, None))

        def writer():
            while True:
                item = to_write.get()
                if item is None:
                    return
                key, buf, fence = item
                try:
                    _wait(fence)
                    self._write(key, buf)
                except BaseException as e:  # noqa: BLE001 - raised by the updating thread
                    errors.append(e)
                    stop.set()
                    free.put(None)  # wakes the reader
                    ready.put((key, None, None))  # wakes the updating thread
                    return
                free.put(buf)

        threads = [threading.Thread(target=reader, name="moe-offload-swap-read", daemon=True),
                   threading.Thread(target=writer, name="moe-offload-swap-write", daemon=True)]
        for t in threads:
            t.start()
        try:
            for _ in keys:
                t = time.perf_counter()
                key, buf, err = ready.get()
                self.stats.exposed_s += time.perf_counter() - t
                if err is not None:
                    raise err
                if buf is None or errors:  # the writer failed
                    break
                fence = update(key, tensor_views(buf, self.store.records[key]))
                to_write.put((key, buf, fence))
        finally:
            stop.set()
            free.put(None)
            to_write.put(None)
            t = time.perf_counter()
            for th in threads:
                th.join()
            self.stats.exposed_s += time.perf_counter() - t
        if errors:
            raise errors[0]
