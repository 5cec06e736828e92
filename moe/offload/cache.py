"""The expert cache: experts resident under a byte budget (LRU), pinned while in use, read from the store by
background reader threads (demand reads before prefetches), with the statistics a user tunes it by.

Every cache decision (hit, miss, which entry is evicted) is made on the calling (compute) thread at request
time, so for a given sequence of requests the hit/miss/eviction sequence is deterministic whatever the disk's
timing; reader threads only move bytes and signal completion.

Devices: on CPU a slot is a slice of one page-locked buffer and the read lands in it; on CUDA slots live in GPU
memory, each reader reads into its own page-locked staging buffer and copies it to the slot on a side stream
(the consumer's stream waits on that copy's event). The same code runs both.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from moe.offload.store import ExpertStore, OffloadError, Record, tensor_views

Key = Tuple[int, int]  # (MoE layer, global expert)
DEMAND, PREFETCH = 0, 1


class _Entry:
    """One record resident in (or being read into) a slot."""

    __slots__ = ("key", "slot", "record", "ready", "error", "pins", "prefetched", "claimed", "cuda_event",
                 "slot_released")

    def __init__(self, key: Key, slot: int, record: Record, prefetched: bool, slot_released=None):
        self.key, self.slot, self.record = key, slot, record
        self.ready = threading.Event()
        self.error: Optional[BaseException] = None
        self.pins = 0
        self.prefetched = prefetched  # read by a prefetch and not used by a demand request yet
        self.claimed = False  # a reader thread took its read
        self.cuda_event = None  # CUDA: the copy into the slot
        self.slot_released = slot_released  # CUDA: compute-stream event after the slot's last use


@dataclass
class CacheStats:
    """Counters of one cache's life; `summary()` turns them into the reported metrics."""

    accesses: Dict[int, int] = field(default_factory=lambda: defaultdict(int))  # per MoE layer
    hits: Dict[int, int] = field(default_factory=lambda: defaultdict(int))  # per MoE layer
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched entries later requested (each counted once)
    prefetch_wasted: int = 0  # prefetched entries evicted before any request
    bytes_read: int = 0
    reads: int = 0
    read_busy_s: float = 0.0  # wall time during which at least one read was in flight
    stall_s: float = 0.0  # compute-thread time spent waiting for reads
    peak_resident_bytes: int = 0
    trace: List[Tuple[str, Key]] = field(default_factory=list)  # ("hit"|"miss"|"evict"|"prefetch", key)

    def summary(self) -> dict:
        acc, hit = sum(self.accesses.values()), sum(self.hits.values())
        return {
            "accesses": acc, "hits": hit, "hit_rate": hit / acc if acc else None,
            "hit_rate_per_layer": {int(k): self.hits[k] / v for k, v in sorted(self.accesses.items()) if v},
            "evictions": self.evictions, "prefetch_issued": self.prefetch_issued,
            "prefetch_used": self.prefetch_used, "prefetch_wasted": self.prefetch_wasted,
            "bytes_read": self.bytes_read, "reads": self.reads,
            "read_busy_seconds": self.read_busy_s,
            "read_GBps": self.bytes_read / self.read_busy_s / 1e9 if self.read_busy_s > 0 else None,
            "stall_seconds": self.stall_s, "peak_resident_bytes": self.peak_resident_bytes,
        }


class _Readers:
    """Reader threads, each with its own aio handle, taking reads from one priority queue (demand first)."""

    def __init__(self, store: ExpertStore, num_threads: int, handle_kwargs: dict, stats: CacheStats,
                 verify: bool, device: torch.device, slots: "torch.Tensor", staging_bytes: int):
        from moe.ops.op_builder import AsyncIOBuilder

        try:
            aio = AsyncIOBuilder().load()
        except RuntimeError as e:
            raise OffloadError(f"--moe-offload nvme needs the native aio op: {e}") from None
        self.store, self.stats, self.verify, self.device, self.slots = store, stats, verify, device, slots
        self.heap: List[tuple] = []
        self.seq = itertools.count()
        self.cond = threading.Condition()
        self.in_flight, self.busy_since = 0, 0.0
        self.closed = False
        self.handles = [aio.aio_handle(**handle_kwargs) for _ in range(num_threads)]
        # CUDA: staging in CUDA-pinned memory (page-aligned, so O_DIRECT lands in it and the copy is a real DMA)
        self.staging = ([torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=True) for _ in self.handles]
                        if device.type == "cuda" else [None] * num_threads)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"moe-offload-reader{i}")
                        for i in range(num_threads)]
        for t in self.threads:
            t.start()

    def submit(self, entry: _Entry, priority: int) -> None:
        with self.cond:
            heapq.heappush(self.heap, (priority, next(self.seq), entry))
            self.cond.notify()

    def _next(self) -> Optional[_Entry]:
        with self.cond:
            while True:
                while not self.heap and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return None
                _, _, entry = heapq.heappop(self.heap)
                if entry.claimed:  # an older copy of a prefetch that was raised to demand priority
                    continue
                entry.claimed = True
                if self.in_flight == 0:
                    self.busy_since = time.perf_counter()
                self.in_flight += 1
                return entry

    def _run(self, i: int) -> None:
        handle, staging = self.handles[i], self.staging[i]
        copy_stream = None
        if self.device.type == "cuda":
            # a new thread's current CUDA device is 0: make this reader's device (explicit index) current, so the
            # stream, its events and the copies all live on the cache's device
            torch.cuda.set_device(self.device)
            copy_stream = torch.cuda.Stream(device=self.device)
        while True:
            entry = self._next()
            if entry is None:
                return
            try:
                rec = entry.record
                if copy_stream is None:
                    self.store.read_into(handle, entry.key, self.slots[entry.slot], self.verify)
                else:
                    self.store.read_into(handle, entry.key, staging, self.verify)
                    with torch.cuda.stream(copy_stream):
                        if entry.slot_released is not None:  # kernels still reading the slot's previous expert
                            copy_stream.wait_event(entry.slot_released)
                        self.slots[entry.slot][:rec.nbytes].copy_(staging[:rec.nbytes], non_blocking=True)
                        entry.cuda_event = torch.cuda.Event()
                        entry.cuda_event.record(copy_stream)
                    entry.cuda_event.synchronize()  # the staging buffer is reused by this thread's next read
            except BaseException as e:  # noqa: BLE001 - handed to the thread that waits for this entry
                entry.error = e
            with self.cond:
                self.in_flight -= 1
                if entry.error is None:
                    self.stats.bytes_read += entry.record.nbytes
                    self.stats.reads += 1
                if self.in_flight == 0:
                    self.stats.read_busy_s += time.perf_counter() - self.busy_since
            entry.ready.set()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()


def _explicit_device(device) -> torch.device:
    """torch.device(device) with an explicit index for CUDA ('cuda' = the caller's current device, resolved now: the
    reader threads would otherwise see device 0, the default of every new thread)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ExpertCache:
    """Experts of a store held in a fixed number of slots under `budget_bytes`, evicted least recently used.

    Args:
        store: the opened ExpertStore.
        budget_bytes: bytes of expert weights kept resident; slots = budget // store.record_bytes.
        device: where the weights are used (cpu, or cuda: slots in GPU memory, reads staged through pinned memory).
        min_slots: fewest slots the caller's layers need at once (k experts at decode); fewer is an OffloadError
            saying the minimum budget.
        prefetch_slots: most slots prefetched-but-unused entries may hold (default: half the slots).
        num_readers: reader threads (one aio handle each); reads of different experts proceed in parallel.
        verify: check every record's checksum after reading it.
        handle_kwargs: aio_handle settings (block_size, queue_depth, intra_op_parallelism, ...).
    Rules: a request pins its entry until release; pinned entries are never evicted. A prefetch never evicts a
    pinned entry or another prefetched-unused one and takes at most `prefetch_slots` slots, so it can neither
    deadlock a demand request nor push out what the running layer needs; a demand read is queued before every
    prefetch not yet started (and a prefetch that becomes demanded is raised to demand priority).
    """

    def __init__(self, store: ExpertStore, budget_bytes: int, device=None, min_slots: int = 1,
                 prefetch_slots: Optional[int] = None, num_readers: int = 2, verify: bool = True,
                 handle_kwargs: Optional[dict] = None, record_trace: bool = False):
        self.store = store
        self.device = _explicit_device(device)
        self.record_bytes = store.record_bytes
        self.num_slots = min(int(budget_bytes // self.record_bytes), len(store.records))
        if self.num_slots < min_slots:
            raise OffloadError(f"--moe-expert-cache-bytes ({budget_bytes} bytes) holds {self.num_slots} expert(s); "
                               f"the model needs at least {min_slots} resident at once: use at least "
                               f"{min_slots * self.record_bytes} bytes")
        self.prefetch_slots = self.num_slots // 2 if prefetch_slots is None else min(prefetch_slots, self.num_slots)
        self.stats = CacheStats()
        self.record_trace = record_trace
        self.lru: "OrderedDict[Key, _Entry]" = OrderedDict()
        self.free: List[int] = list(range(self.num_slots - 1, -1, -1))
        self.prefetcher = None  # set by moe.offload.prefetch.GatePrefetcher
        self.resident_bytes = 0
        self.slots = self._allocate_slots()
        self.slot_events: List[Optional[object]] = [None] * self.num_slots
        kw = dict(block_size=1 << 20, queue_depth=32, intra_op_parallelism=1)
        kw.update(handle_kwargs or {})
        self.readers = _Readers(store, num_readers, kw, self.stats, verify, self.device, self.slots,
                                self.record_bytes)

    def _allocate_slots(self) -> List[torch.Tensor]:
        n, rb = self.num_slots, self.record_bytes
        if self.device.type == "cuda":
            whole = torch.empty(n * rb, dtype=torch.uint8, device=self.device)
        else:
            from moe.ops.op_builder import AsyncIOBuilder

            try:
                h = AsyncIOBuilder().load().aio_handle()
            except RuntimeError as e:
                raise OffloadError(f"--moe-offload nvme needs the native aio op: {e}") from None
            whole = h.new_cpu_locked_tensor(n * rb, torch.empty(0, dtype=torch.uint8))
        return [whole[i * rb:(i + 1) * rb] for i in range(n)]

    # ----------------------------------------------------------------------------------------- demand side
    def contains(self, key: Key) -> bool:
        return key in self.lru

    def request(self, key: Key) -> _Entry:
        """Pins `key`'s entry (a hit, or a miss that starts a demand read); counts the access."""
        layer = key[0]
        self.stats.accesses[layer] += 1
        entry = self.lru.get(key)
        if entry is not None:
            self.stats.hits[layer] += 1
            self.lru.move_to_end(key)
            self._trace("hit", key)
            if entry.prefetched:
                entry.prefetched = False
                self.stats.prefetch_used += 1
                if not entry.claimed:
                    self.readers.submit(entry, DEMAND)  # raised above every prefetch still queued
        else:
            self._trace("miss", key)
            entry = self._new_entry(key, self._take_slot(for_prefetch=False), prefetched=False)
            self.readers.submit(entry, DEMAND)
        entry.pins += 1
        return entry

    def wait(self, entry: _Entry) -> Dict[str, torch.Tensor]:
        """The entry's tensors once its read finished (time blocked counts as stall); raises its read error."""
        if not entry.ready.is_set():
            t0 = time.perf_counter()
            entry.ready.wait()
            self.stats.stall_s += time.perf_counter() - t0
        if entry.error is not None:
            err = entry.error
            self._drop(entry)
            raise err
        if entry.cuda_event is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.cuda_event)
        return tensor_views(self.slots[entry.slot], entry.record)

    def release(self, entry: _Entry) -> None:
        assert entry.pins > 0, "release without request"
        entry.pins -= 1
        if self.device.type == "cuda":  # the next read into this slot waits for the kernels queued so far
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.slot_events[entry.slot] = event

    def stream(self, layer: int, experts: Sequence[int]) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        """Yields (expert, tensors) for each of `experts` of MoE layer `layer`, resident ones first.

        At most num_slots entries are pinned at once: while the caller computes one expert, the reads of the
        next ones are in flight. Each entry is released when the caller asks for the next one. The prefetcher
        (if any) sees the layer's true expert set, and its pending prediction is issued once this layer's
        first window is pinned (so a prefetch cannot take what this layer needs).
        """
        order = ([e for e in experts if (layer, e) in self.lru] + [e for e in experts if (layer, e) not in self.lru])
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, experts)
        window: List[Tuple[int, _Entry]] = []
        nxt = 0
        flushed = False
        try:
            while nxt < len(order) or window:
                while nxt < len(order) and len(window) < self.num_slots and self._can_pin():
                    window.append((order[nxt], self.request((layer, order[nxt]))))
                    nxt += 1
                if not flushed and self.prefetcher is not None:
                    self.prefetcher.flush()
                    flushed = True
                expert, entry = window.pop(0)
                try:
                    tensors = self.wait(entry)
                    yield expert, tensors
                finally:
                    self.release(entry)
        finally:
            for _, entry in window:
                self.release(entry)
            if not flushed and self.prefetcher is not None:  # a layer with nothing routed still hands over
                self.prefetcher.flush()

    def _can_pin(self) -> bool:
        return bool(self.free) or any(e.pins == 0 for e in self.lru.values())

    # --------------------------------------------------------------------------------------- prefetch side
    def prefetch(self, keys: Iterable[Key]) -> int:
        """Starts background reads of `keys` not resident; returns how many were issued."""
        issued = 0
        for key in keys:
            if key in self.lru or key not in self.store.records:
                continue
            if sum(1 for e in self.lru.values() if e.prefetched) >= self.prefetch_slots:
                break
            slot = self._take_slot(for_prefetch=True)
            if slot is None:
                break
            entry = self._new_entry(key, slot, prefetched=True)
            self.readers.submit(entry, PREFETCH)
            self.stats.prefetch_issued += 1
            self._trace("prefetch", key)
            issued += 1
        return issued

    # --------------------------------------------------------------------------------------------- slots
    def _new_entry(self, key: Key, slot: int, prefetched: bool) -> _Entry:
        entry = _Entry(key, slot, self.store.records[key], prefetched, self.slot_events[slot])
        self.lru[key] = entry
        self.resident_bytes += entry.record.nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.resident_bytes)
        return entry

    def _take_slot(self, for_prefetch: bool) -> Optional[int]:
        """A free slot, or the least recently used evictable entry's; None when a prefetch finds none."""
        if self.free:
            return self.free.pop()
        victim = None
        for entry in self.lru.values():  # oldest first
            if entry.pins or (for_prefetch and (entry.prefetched or not entry.ready.is_set())):
                continue
            victim = entry
            break
        if victim is None:
            if for_prefetch:
                return None
            raise RuntimeError("expert cache: every slot is pinned (internal error: too many experts requested "
                               "at once)")
        victim.ready.wait()  # a read still landing in this slot (a demand may evict an in-flight prefetch)
        self._evict(victim)
        return victim.slot

    def _evict(self, entry: _Entry) -> None:
        del self.lru[entry.key]
        self.resident_bytes -= entry.record.nbytes
        self.stats.evictions += 1
        if entry.prefetched:
            self.stats.prefetch_wasted += 1
        self._trace("evict", entry.key)

    def _drop(self, entry: _Entry) -> None:
        """Forgets an entry whose read failed (its slot is free again)."""
        if self.lru.get(entry.key) is entry:
            del self.lru[entry.key]
            self.resident_bytes -= entry.record.nbytes
            self.free.append(entry.slot)

    def _trace(self, what: str, key: Key) -> None:
        if self.record_trace:
            self.stats.trace.append((what, key))

    def close(self) -> None:
        self.readers.close()

    def __del__(self):
        readers = getattr(self, "readers", None)
        if readers is not None and not readers.closed:
            readers.close()
