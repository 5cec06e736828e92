"""The vocab-parallel KD loss over a 2-way TP vocabulary split (gloo) equals the unsplit loss: values and the
student gradient, with and without Megatron vocabulary padding."""
import pytest
import torch
import torch.distributed as dist

from moe.distill import DistillConfig, kd_loss
from tests.dist.launcher import run_distributed_jobs

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


VOCAB_SIZES = (None, 7)  # 7: columns 7..9 of rank 1's shard are padding


@pytest.fixture(scope="module")
def sharded_runs():
    """Both tests' 2-rank runs in one spawn."""
    kd, fused = run_distributed_jobs([(_sharded, (VOCAB_SIZES,)), (_fused_sharded, ())], 2)
    return {"kd": kd, "fused": fused}


def test_vocab_parallel_kd_equals_unsplit(sharded_runs):
    vocab_sizes = VOCAB_SIZES
    ranks = sharded_runs["kd"]
    for i, vocab_size in enumerate(vocab_sizes):
        ref_total, ref_kd, ref_grad = _loss_and_grad(*_inputs(), None, vocab_size)
        for r, outs in enumerate(ranks):
            total, kd_term, grad = outs[i]
            # fp64; the split only changes the summation order of the log-normalisers and partial sums
            torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(kd_term, ref_kd, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(grad, ref_grad[..., r * V // 2:(r + 1) * V // 2], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ fused head loss
H = 4
FUSED_CASES = ((1.0, None), (2.0, 7), (1.0, 4))  # vocab 4: rank 1's whole slice is padding


def _fused_inputs():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (B, S), generator=g)
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    return hidden, weight, labels, teacher, mask


def _fused(hidden, weight, labels, teacher, mask, T, vocab_size, group):
    from megatron.model.fused_lm_loss import DistillTarget, fused_lm_kd_loss

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, _, kl = fused_lm_kd_loss(h, w, labels, DistillTarget(teacher, mask, T, 0.5, 2.0, vocab_size), group)
    total.backward()
    return total.detach(), kl, h.grad, w.grad


def _fused_sharded(rank, world_size):
    hidden, weight, labels, teacher, mask = _fused_inputs()
    v = V // world_size
    cols = slice(rank * v, (rank + 1) * v)
    return [_fused(hidden, weight[cols], labels, teacher[..., cols], mask, T_, vs, dist.group.WORLD)
            for T_, vs in FUSED_CASES]


def test_fused_kd_over_a_two_way_vocab_split_equals_unsplit(sharded_runs):
    """Each rank holds half the head's rows and the teacher's matching columns (as under TP 2); the loss and KL are
    the unsplit ones on both ranks, each rank's head gradient is its rows of the unsplit gradient, and the hidden
    gradients sum to the unsplit one (what copy_to_tensor_parallel_region's backward all-reduce does)."""
    ranks = sharded_runs["fused"]
    for i, (T_, vocab_size) in enumerate(FUSED_CASES):
        ref_total, ref_kl, ref_gh, ref_gw = _fused(*_fused_inputs(), T_, vocab_size, None)
        for r, outs in enumerate(ranks):
            total, kl, gh, gw = outs[i]
            # fp64; the split only changes the summation order of the maxima, sums and GEMMs
            torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(kl, ref_kl, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gw, ref_gw[r * V // 2:(r + 1) * V // 2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ranks[0][i][2] + ranks[1][i][2], ref_gh, rtol=1e-12, atol=1e-12)
