"""The vocab-parallel KD loss over a 2-way TP vocabulary split (gloo) equals the unsplit loss: values and the
student gradient, with and without Megatron vocabulary padding."""
import torch
import torch.distributed as dist

from moe.distill import DistillConfig, kd_loss
from tests.dist.launcher import run_distributed

B, S, V, T = 2, 3, 10, 2.0


def _inputs():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    return student, teacher, mask


def _loss_and_grad(student, teacher, mask, group, vocab_size):
    student = student.clone().requires_grad_()
    cfg = DistillConfig(mos=True, load_teacher="/unused", kd_temp=T, kd_alpha_ce=0.5, kd_beta_ce=2.0)
    total, kd_term = kd_loss(torch.tensor(1.25, dtype=torch.float64), student, teacher, mask, cfg, group, vocab_size)
    total.backward()
    return total.detach(), kd_term.detach(), student.grad


def _sharded(rank, world_size, vocab_sizes):
    student, teacher, mask = _inputs()
    v = V // world_size
    shard = slice(rank * v, (rank + 1) * v)  # rank r holds vocabulary [r*v, (r+1)*v), as the LM head splits it
    return [_loss_and_grad(student[..., shard], teacher[..., shard], mask, dist.group.WORLD, vs) for vs in vocab_sizes]


def test_vocab_parallel_kd_equals_unsplit():
    vocab_sizes = (None, 7)  # 7: columns 7..9 of rank 1's shard are padding
    ranks = run_distributed(_sharded, 2, vocab_sizes)  # one spawn for both cases
    for i, vocab_size in enumerate(vocab_sizes):
        ref_total, ref_kd, ref_grad = _loss_and_grad(*_inputs(), None, vocab_size)
        for r, outs in enumerate(ranks):
            total, kd_term, grad = outs[i]
            # fp64; the split only changes the summation order of the log-normalisers and partial sums
            torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(kd_term, ref_kd, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, ref_grad[..., r * V // 2:(r + 1) * V // 2], rtol=1e-12, atol=1e-12)
