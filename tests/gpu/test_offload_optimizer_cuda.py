"""The NVMe optimizer offload with parameters on the GPU: swap buffers registered with CUDA, updates on the swap's
own stream on the parameters' device, and the result equal to torch.optim.AdamW in GPU memory."""
import pytest
import torch

from moe.offload.config import OptimizerOffloadConfig
from moe.offload.swap import StateSwapper

try:
    StateSwapper.load_aio()
    AIO_ERROR = None
except Exception as e:  # noqa: BLE001 - reported as the skip reason
    AIO_ERROR = e


@pytest.mark.skipif(AIO_ERROR is not None, reason=f"aio op not built: {AIO_ERROR}")
@pytest.mark.parametrize("overlap", [False, True], ids=["in-step", "overlap"])
def test_offloaded_adamw_on_cuda_equals_in_memory(tmp_path, overlap):
    from megatron.config import OptimizerConfig
    from megatron.optimizer import build_optimizer
    from moe.config import MoEConfig
    from moe.layer import MoELayer

    def run(offload):
        torch.manual_seed(0)
        layer = MoELayer(64, 128, 4, MoEConfig(num_experts=(4,), expert_interval=1)).cuda()
        layer.layer_index = 0
        opt = build_optimizer(layer, OptimizerConfig(lr=1e-2, weight_decay=0.1), offload=offload)
        if offload is not None:
            assert all(b.is_pinned() for b in opt.swapper.buffers)  # registered with CUDA: async DMA
            assert opt._cuda.stream != torch.cuda.current_stream()  # the swap's own stream...
            assert opt._cuda.device == next(layer.parameters()).device  # ...on the parameters' device
        x = torch.randn(256, 64, device="cuda")
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            layer(x)[0].pow(2).mean().backward()
            opt.step()
            for g in opt.param_groups:
                g["lr"] = 1e-2 / (step + 2)
        if offload is not None:
            opt.synchronize()
        torch.cuda.synchronize()
        return layer, opt

    ref, ref_opt = run(None)
    off, opt = run(OptimizerOffloadConfig(mode="nvme", directory=str(tmp_path / "off"), overlap=overlap))
    for (n, p), (_, q) in zip(ref.named_parameters(), off.named_parameters()):
        assert torch.equal(p, q), n  # AdamW is elementwise: the same kernels on the same values
    for e in range(4):
        for name, p in ref.experts.named_parameters():
            got, want = opt.expert_state(0, e)[f"experts.{name}"], ref_opt.state[p]
            assert torch.equal(got["step"].cpu(), want["step"].cpu())
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got[k], want[k][e]), (e, name, k)
    opt.close()
    assert opt.swapper._unregister is None
