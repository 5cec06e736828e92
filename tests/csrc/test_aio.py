"""csrc/aio (moe.ops._aio): exact write-then-read round trips, async batching, errors, GIL release.

Every comparison is exact (bytes), since I/O must not change a single bit. Files go to a temporary
directory on the real disk (O_DIRECT) and are deleted after each test to keep disk use bounded.
"""
import os
import shutil
import tempfile
import threading
import time

import pytest
import torch

from moe.ops.op_builder import AsyncIOBuilder

try:
    aio = AsyncIOBuilder().load()
except RuntimeError as err:  # never silently green: the reason shows in `pytest -rs`
    pytest.skip(f"aio extension unavailable: {err}", allow_module_level=True)

MiB = 1 << 20
SIZES = [1, 4095, 4096, MiB + 3, 64 * MiB]
DTYPES = [torch.uint8, torch.float32, torch.bfloat16]
OFFSETS = [8192, 12345]  # page-aligned (direct from locked memory) and unaligned (buffered head/tail)


@pytest.fixture(scope="module")
def random_bytes():
    """64 MiB + 4 KiB of seeded random bytes; tensors of every dtype are byte views of it."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (64 * MiB + 4096,), dtype=torch.uint8, generator=gen)


@pytest.fixture
def io_dir():
    """A directory on the same disk as /tmp (not tmpfs where avoidable), removed afterwards."""
    path = tempfile.mkdtemp(prefix="aio_test_", dir=os.environ.get("MOE_AIO_TEST_DIR", "/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def handle():
    return aio.aio_handle(block_size=MiB, queue_depth=16, single_submit=False, overlap_events=True,
                          intra_op_parallelism=2)


def make_tensor(handle, num_bytes, dtype, locked, random_bytes):
    """A tensor of ~num_bytes (at least one element) of `dtype` holding random bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    num_elem = max(1, num_bytes // itemsize)
    src = random_bytes[: num_elem * itemsize].view(dtype)
    if locked:
        t = handle.new_cpu_locked_tensor(num_elem, src)
        t.copy_(src)
        return t
    return src.clone()


def as_bytes(t):
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("locked", [True, False], ids=["locked", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_round_trip_exact(handle, io_dir, random_bytes, size, dtype, locked, offset):
    src = make_tensor(handle, size, dtype, locked, random_bytes)
    path = os.path.join(io_dir, "t.bin")
    assert handle.sync_pwrite(src, path, offset) == 1
    nbytes = src.numel() * src.element_size()
    assert os.path.getsize(path) == offset + nbytes
    with open(path, "rb") as f:  # what landed on disk, read independently of the extension
        f.seek(offset)
        assert f.read() == as_bytes(src).numpy().tobytes()
    dst = handle.new_cpu_locked_tensor(src.numel(), src) if locked else torch.empty_like(src)
    dst.fill_(0)
    assert handle.sync_pread(dst, path, offset) == 1
    assert torch.equal(as_bytes(dst), as_bytes(src))


def test_write_keeps_the_rest_of_the_file(handle, io_dir, random_bytes):
    path = os.path.join(io_dir, "t.bin")
    base = random_bytes[: 3 * 4096 + 17].clone()
    handle.sync_pwrite(base, path)
    patch = torch.full((5000,), 7, dtype=torch.uint8)
    handle.sync_pwrite(patch, path, 1000)
    expected = base.clone()
    expected[1000:6000] = 7
    with open(path, "rb") as f:
        assert f.read() == expected.numpy().tobytes()


def test_many_async_ops_then_one_wait(handle, io_dir, random_bytes):
    srcs = [make_tensor(handle, MiB + 1000 * i, torch.float32, i % 2 == 0, random_bytes) for i in range(8)]
    paths = [os.path.join(io_dir, f"{i}.bin") for i in range(8)]
    for i, (src, path) in enumerate(zip(srcs, paths)):
        assert handle.async_pwrite(src, path, 4096 * i + i) == 0
    assert handle.wait() == 8
    assert handle.wait() == 0
    dsts = [torch.zeros_like(s) for s in srcs]
    for i, (dst, path) in enumerate(zip(dsts, paths)):
        handle.async_pread(dst, path, 4096 * i + i)
    assert handle.wait() == 8
    for src, dst in zip(srcs, dsts):
        assert torch.equal(as_bytes(src), as_bytes(dst))  # bytes: random floats include NaNs


def test_sync_op_also_completes_pending_async_ops(handle, io_dir, random_bytes):
    # DeepNVMe semantics: a sync call waits for everything pending and returns the total count.
    a, b = random_bytes[:5000].clone(), random_bytes[5000:9000].clone()
    handle.async_pwrite(a, os.path.join(io_dir, "a.bin"))
    assert handle.sync_pwrite(b, os.path.join(io_dir, "b.bin")) == 2
    assert handle.wait() == 0


@pytest.mark.parametrize("offset", [0, 12345])
def test_intra_op_parallelism_gives_identical_files(io_dir, random_bytes, offset):
    src = random_bytes[: 5 * MiB + 3].clone()
    contents = []
    for threads in (1, 2, 4):
        h = aio.aio_handle(block_size=256 * 1024, queue_depth=8, intra_op_parallelism=threads)
        assert h.get_intra_op_parallelism() == threads
        path = os.path.join(io_dir, f"p{threads}.bin")
        h.sync_pwrite(src, path, offset)
        with open(path, "rb") as f:
            contents.append(f.read())
        dst = torch.zeros_like(src)
        h.sync_pread(dst, path, offset)
        assert torch.equal(dst, src)
    assert contents[0] == contents[1] == contents[2]


@pytest.mark.parametrize("single_submit", [False, True])
@pytest.mark.parametrize("overlap_events", [False, True])
def test_submit_modes_round_trip(io_dir, random_bytes, single_submit, overlap_events):
    h = aio.aio_handle(block_size=64 * 1024, queue_depth=4, single_submit=single_submit,
                       overlap_events=overlap_events, intra_op_parallelism=1)
    assert (h.get_single_submit(), h.get_overlap_events()) == (single_submit, overlap_events)
    for locked in (True, False):
        src = make_tensor(h, MiB + 3, torch.uint8, locked, random_bytes)
        path = os.path.join(io_dir, "m.bin")
        h.sync_pwrite(src, path, 4096)
        dst = torch.zeros_like(src)
        h.sync_pread(dst, path, 4096)
        assert torch.equal(dst, src)


@pytest.mark.parametrize("queue_depth", [1, 5, 16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_size", [64 * 1024, 12 * 1024])
def test_misaligned_tensor_many_ring_turns(io_dir, random_bytes, queue_depth, threads, block_size):
    # A tensor 64 bytes into a page goes through the bounce ring (queue_depth requests in flight plus
    # spare slots copied ahead; a slot holds up to 4 MiB / block_size requests, so with 12 KiB blocks
    # a slot is many requests and the last one of a slot and of the tensor is partial); many more
    # requests than slots turn the ring over and over. Bytes around the tensor's view stay untouched.
    h = aio.aio_handle(block_size=block_size, queue_depth=queue_depth, intra_op_parallelism=threads)
    size = 3 * MiB + 4096 * 5 + 7
    backing = h.new_cpu_locked_tensor(size + 8192, torch.empty(0, dtype=torch.uint8))
    backing.copy_(random_bytes[: size + 8192])
    src = backing[64 : 64 + size]
    expected = src.clone()
    path = os.path.join(io_dir, "ring.bin")
    for offset in (0, 4096 * 3, 777):
        if os.path.exists(path):
            os.unlink(path)
        h.async_pwrite(src, path, offset)
        assert h.wait() == 1
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read() == expected.numpy().tobytes()
        dst_backing = torch.full((size + 8192,), 0xA5, dtype=torch.uint8)
        dst = dst_backing[4032 : 4032 + size]  # 64 bytes before a page boundary
        h.sync_pread(dst, path, offset)
        assert torch.equal(dst, expected)
        assert bool(dst_backing[:4032].eq(0xA5).all()) and bool(dst_backing[4032 + size :].eq(0xA5).all())
    h.free_cpu_locked_tensor(backing)


def test_validate_flag(handle, io_dir, random_bytes):
    src = random_bytes[: MiB + 5].clone()
    path = os.path.join(io_dir, "v.bin")
    assert handle.pwrite(src, path, True, False, 100) == 1
    dst = torch.zeros_like(src)
    assert handle.pread(dst, path, True, False, 100) == 1
    assert torch.equal(dst, src)


def test_handle_settings_and_defaults():
    h = aio.aio_handle()
    assert (h.get_block_size(), h.get_queue_depth(), h.get_single_submit(), h.get_overlap_events(),
            h.get_intra_op_parallelism()) == (1048576, 128, False, False, 1)
    h = aio.aio_handle(block_size=4096, queue_depth=2, single_submit=True, overlap_events=True,
                       intra_op_parallelism=3)
    assert (h.get_block_size(), h.get_queue_depth(), h.get_single_submit(), h.get_overlap_events(),
            h.get_intra_op_parallelism()) == (4096, 2, True, True, 3)
    assert h.wait() == 0


def test_locked_tensor_alloc_and_free(handle):
    example = torch.empty(0, dtype=torch.bfloat16)
    t = handle.new_cpu_locked_tensor(12345, example)
    assert t.dtype == torch.bfloat16 and t.shape == (12345,) and t.device.type == "cpu"
    assert t.data_ptr() % 4096 == 0
    assert handle.free_cpu_locked_tensor(t) is True
    assert handle.free_cpu_locked_tensor(t) is False
    assert handle.free_cpu_locked_tensor(torch.empty(3)) is False


def test_builder_reports_compatible():
    assert AsyncIOBuilder().is_compatible()


# ---- errors: every one names the path, the offset, the byte count and (for OS errors) the errno text


def test_error_missing_directory(handle, io_dir):
    path = os.path.join(io_dir, "no_such_dir", "x.bin")
    with pytest.raises(FileNotFoundError, match=r"no_such_dir/x\.bin' at offset 64 \(4096 bytes\): No such file"):
        handle.sync_pwrite(torch.zeros(4096, dtype=torch.uint8), path, 64)


def test_error_missing_file(handle, io_dir):
    path = os.path.join(io_dir, "missing.bin")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin' at offset 0 \(400 bytes\): No such file"):
        handle.sync_pread(torch.zeros(100), path)


def test_error_file_shorter_than_tensor(handle, io_dir):
    path = os.path.join(io_dir, "short.bin")
    handle.sync_pwrite(torch.zeros(1000, dtype=torch.uint8), path)
    with pytest.raises(EOFError, match=r"4096 bytes at offset 10 from '.*short\.bin'.*ends at byte 1000"):
        handle.sync_pread(torch.zeros(1024), path, 10)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full (always ENOSPC) not present")
def test_error_no_space_left(io_dir):
    h = aio.aio_handle()
    with pytest.warns(RuntimeWarning, match="O_DIRECT"):  # a device node refuses O_DIRECT
        with pytest.raises(OSError, match=r"/dev/full' at offset 0 \(8192 bytes\): No space left") as info:
            h.sync_pwrite(torch.zeros(8192, dtype=torch.uint8), "/dev/full")
    assert info.value.errno == 28
    # The same failure from an async write surfaces in wait(), after the request completed.
    assert h.async_pwrite(torch.zeros(100, dtype=torch.uint8), "/dev/full", 0) == 0
    with pytest.raises(OSError, match="No space left"):
        h.wait()
    assert h.wait() == 0


def test_error_non_contiguous(handle, io_dir):
    with pytest.raises(ValueError, match=r"must be contiguous.*strides \[1, 8\].*x\.bin"):
        handle.sync_pwrite(torch.zeros(8, 8).t(), os.path.join(io_dir, "x.bin"))


def test_error_unsupported_device(handle, io_dir):
    with pytest.raises(ValueError, match=r"unsupported device meta.*x\.bin"):
        handle.sync_pread(torch.empty(16, device="meta"), os.path.join(io_dir, "x.bin"))


def test_error_bad_settings_and_offset(handle, io_dir):
    with pytest.raises(ValueError, match=r"queue_depth must be positive, got 0"):
        aio.aio_handle(queue_depth=0)
    with pytest.raises(ValueError, match=r"intra_op_parallelism must be positive, got -1"):
        aio.aio_handle(intra_op_parallelism=-1)
    with pytest.raises(ValueError, match=r"file_offset must be >= 0, got -5"):
        handle.sync_pwrite(torch.zeros(4), os.path.join(io_dir, "x.bin"), -5)


# ---- buffered fallback (filesystems that refuse O_DIRECT) and tmpfs


def test_buffered_fallback_warns_and_round_trips(io_dir, random_bytes, monkeypatch):
    monkeypatch.setenv("MOE_AIO_DISABLE_O_DIRECT", "1")  # same path as open(O_DIRECT) -> EINVAL
    h = aio.aio_handle(intra_op_parallelism=2)
    src = random_bytes[: 3 * MiB + 3].clone()
    path = os.path.join(io_dir, "b.bin")
    with pytest.warns(RuntimeWarning, match="falling back to buffered I/O"):
        h.sync_pwrite(src, path, 777)
    dst = torch.zeros_like(src)
    h.sync_pread(dst, path, 777)
    assert torch.equal(dst, src)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm (tmpfs) here")
def test_tmpfs_round_trip(random_bytes):
    d = tempfile.mkdtemp(prefix="aio_test_", dir="/dev/shm")
    try:
        h = aio.aio_handle(intra_op_parallelism=2)
        src = random_bytes[: 2 * MiB + 3].clone()
        path = os.path.join(d, "s.bin")
        h.sync_pwrite(src, path, 4096)  # O_DIRECT where tmpfs supports it (Linux >= 6.6), else fallback
        dst = torch.zeros_like(src)
        h.sync_pread(dst, path, 4096)
        assert torch.equal(dst, src)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- the GIL is released while a sync call blocks


def test_other_thread_runs_during_sync_pread(io_dir, random_bytes):
    h = aio.aio_handle(block_size=256 * 1024, queue_depth=4)
    src = random_bytes[: 64 * MiB].clone()
    path = os.path.join(io_dir, "g.bin")
    h.sync_pwrite(src, path)
    stamps, stop = [], threading.Event()

    def ticker():
        while not stop.is_set():
            time.sleep(0.0005)
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.01)
        dst = torch.empty_like(src)
        start = time.perf_counter()
        h.sync_pread(dst, path)
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    inside = [s for s in stamps if start < s < end]
    # Holding the GIL would allow at most one tick (between perf_counter() and the call itself).
    assert end - start < 0.005 or len(inside) >= 3, f"{len(inside)} ticks in a {end - start:.3f}s read"
    assert torch.equal(dst, src)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_tensor_round_trip(io_dir, random_bytes):
    h = aio.aio_handle(intra_op_parallelism=2)
    src = random_bytes[: MiB + 3].clone().cuda()
    path = os.path.join(io_dir, "c.bin")
    h.sync_pwrite(src, path, 12345)
    dst = torch.zeros_like(src)
    h.sync_pread(dst, path, 12345)
    assert torch.equal(dst.cpu(), src.cpu())
