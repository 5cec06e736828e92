"""The CUDA parts of the NVMe optimizer offload, checked on a CPU machine: they are selected only for CUDA parameters
(on their explicit device), the swap buffers are registered with CUDA through torch's cudart, the writer waits on
each record's fence before writing it, and the event-ordered update path computes exactly torch's AdamW (run on
the CPU with a fake stream/event object standing in for the CUDA one)."""
import contextlib

import pytest
import torch

from megatron.optimizer import offload as offload_mod
from moe.offload import store, swap
from moe.offload.config import OptimizerOffloadConfig

try:
    swap.StateSwapper.load_aio()
    AIO_ERROR = None
except Exception as e:  # noqa: BLE001 - reported as the skip reason
    AIO_ERROR = e
pytestmark = pytest.mark.skipif(AIO_ERROR is not None, reason=f"aio op not built: {AIO_ERROR}")


def test_cuda_machinery_is_selected_only_for_cuda_on_the_explicit_device(monkeypatch):
    assert offload_mod.cuda_swap_for(torch.device("cpu")) is None
    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(device) or object())
    cuda = offload_mod.cuda_swap_for(torch.device("cuda", 1))
    assert isinstance(cuda, offload_mod._CudaSwap) and made == [torch.device("cuda", 1)]


class _FakeCudart:
    def __init__(self, err=0):
        self.calls, self.err = [], err

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append(("register", ptr, size, flags))
        return self.err

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def _store(tmp_path, n=4):
    layout = [(0, e, {"a": ((16,), torch.float32)}) for e in range(n)]
    return store.open_training_store(str(tmp_path / "s"), 0, layout, {"run": 1})


def test_swap_buffers_registered_with_cuda_only_when_asked(tmp_path, monkeypatch):
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    st, lock = _store(tmp_path)
    plain = swap.StateSwapper(st, 2, {"block_size": 4096, "queue_depth": 4})
    assert fake.calls == []
    plain.close()
    pinned = swap.StateSwapper(st, 2, {"block_size": 4096, "queue_depth": 4}, pin_cuda=True)
    ptr = pinned.buffers[0].data_ptr()
    assert fake.calls == [("register", ptr, 2 * st.record_bytes, 0)]  # one registration of all the buffers
    pinned.close()
    pinned.close()
    assert fake.calls[1:] == [("unregister", ptr)]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(err=2))
    with pytest.raises(store.OffloadError, match="cudaHostRegister .* failed"):
        swap.StateSwapper(st, 2, {"block_size": 4096, "queue_depth": 4}, pin_cuda=True)
    lock.close()


class _Fence:
    def __init__(self, log, key):
        self.log, self.key = log, key

    def synchronize(self):
        self.log.append(("fence", self.key))


@pytest.mark.parametrize("pipeline", [True, False])
def test_writer_waits_on_each_records_fence_before_writing(tmp_path, pipeline):
    st, lock = _store(tmp_path)
    sw = swap.StateSwapper(st, 3, {"block_size": 4096, "queue_depth": 4}, pipeline=pipeline)
    log = []
    write = sw._write
    sw._write = lambda key, buf, count=True: (log.append(("write", key)), write(key, buf, count))

    def update(key, views):
        views["a"].add_(1)
        return _Fence(log, key)

    sw.run(st.keys(), update)
    for key in st.keys():
        assert log.index(("fence", key)) < log.index(("write", key))
    assert torch.equal(sw.read((0, 2))["a"], torch.ones(16))
    lock.close()


class _FakeEvent:
    def __init__(self, log, n):
        self.log, self.n = log, n

    def synchronize(self):
        self.log.append(("event-synchronize", self.n))


class _FakeCudaSwap:
    """_CudaSwap's interface on the CPU: no stream, events that log; what the optimizer asks of it is recorded."""

    def __init__(self):
        self.device, self.log, self.n = torch.device("cpu"), [], 0

    def follow_training(self, grads):
        self.log.append(("follow", len(list(grads))))

    def context(self):
        return contextlib.nullcontext()

    def mark(self):
        self.n += 1
        self.log.append(("mark", self.n))
        return _FakeEvent(self.log, self.n)

    def training_waits(self, event=None):
        self.log.append(("training-waits", None if event is None else event.n))


@pytest.mark.parametrize("overlap", [False, True], ids=["in-step", "overlap"])
def test_event_ordered_update_path_equals_torch_adamw(tmp_path, overlap):
    """The CUDA branch of the update (copy in, AdamW, copy back, event as the fence; per-layer events for the next
    forward) run on the CPU through the fake: 3 steps equal torch.optim.AdamW exactly; the swap never synchronises
    the training thread except through training_waits."""
    from megatron.config import OptimizerConfig
    from megatron.optimizer import build_optimizer
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    def run(offload):
        torch.manual_seed(0)
        layer = MoELayer(32, 64, 4, MoEConfig(num_experts=(4,), expert_interval=1))
        layer.layer_index = 0
        opt = build_optimizer(layer, OptimizerConfig(lr=1e-2, weight_decay=0.1), offload=offload)
        fake = None
        if offload is not None:
            inner = opt.optimizer  # the ExpertOffloadAdamW behind the optimizer interface
            assert inner._cuda is None and inner.swapper._unregister is None  # CPU parameters: no CUDA machinery
            inner._cuda = fake = _FakeCudaSwap()
        x = torch.randn(64, 32)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            layer(x)[0].pow(2).mean().backward()
            opt.step()
        if offload is not None:
            opt.synchronize()
        return layer, opt, fake

    ref, _, _ = run(None)
    off, opt, fake = run(OptimizerOffloadConfig(mode="nvme", directory=str(tmp_path / "off"), overlap=overlap))
    for (n, p), (_, q) in zip(ref.named_parameters(), off.named_parameters()):
        assert torch.equal(p, q), n
    kinds = [k for k, _ in fake.log]
    assert kinds.count("follow") == 3  # the swap stream follows the training stream once per step
    # one fence per record (4 experts) plus one event per layer release, per step; each fence waited on by the writer
    assert kinds.count("mark") == 3 * (4 + 1) and kinds.count("event-synchronize") == 3 * 4
    assert "training-waits" in kinds  # the training stream waits on the swap stream (never the host)
    opt.close()
