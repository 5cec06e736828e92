"""The four autograd collectives of Megatron's tensor parallelism (f, g and the gather/scatter pair).

copy_to   : forward identity,           backward all-reduce   (enters a column-parallel region)
reduce_from: forward all-reduce,        backward identity     (leaves a row-parallel region)
gather_from: forward all-gather (last dim), backward take own chunk
scatter_to : forward take own chunk,    backward all-gather (last dim)
With no group or a 1-rank group each is the identity.

Sequence parallelism (Megatron-LM's sequence-parallel mappings; activations here are [b, s, h], so the sequence is
dim 1, where Megatron's [s, b, h] has it at dim 0):
scatter_to_sequence_parallel_region   : forward take own sequence chunk, backward all-gather
gather_from_sequence_parallel_region  : forward all-gather,  backward reduce-scatter (or take own chunk when the
                                        gradient is already complete on every rank: tensor_parallel_output_grad=False)
reduce_scatter_to_sequence_parallel_region: forward reduce-scatter, backward all-gather
"""
import torch
import torch.distributed as dist


def tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if x.shape[-1] % n != 0:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=-1)[tp_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if tp_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if tp_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if tp_size(group) == 1 else _GatherFromRegion.apply(x, group)



# ------------------------------------------------------------------------------------------ sequence parallelism
SEQ_DIM = 1  # activations are [b, s, h]


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, SEQ_DIM).contiguous()


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    n = tp_size(group)
    if x.shape[SEQ_DIM] % n != 0:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by the tensor-parallel size {n} "
                         f"(--sequence-parallel)")
    return x.chunk(n, dim=SEQ_DIM)[tp_rank(group)].contiguous()


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    xs = _seq_first(x)
    out = xs.new_empty((xs.shape[0] * tp_size(group),) + tuple(xs.shape[1:]))
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name where it exists
    ag(out, xs, group=group)
    return out.transpose(0, SEQ_DIM).contiguous()


def reduce_scatter_along_dim(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """Sum over `group` of x, this rank's 1/n of it along `dim` (one reduce-scatter)."""
    n = tp_size(group)
    if x.shape[dim] % n != 0:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by the group size {n}")
    xs = x.transpose(0, dim).contiguous()
    out = xs.new_empty((xs.shape[0] // n,) + tuple(xs.shape[1:]))
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # the newer name where it exists
    rs(out, xs, group=group)
    return out.transpose(0, dim).contiguous()


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return reduce_scatter_along_dim(grad, ctx.group), None, None
        return _split_seq(grad, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] -> this rank's [b, s/tp, h] (the embedding output entering the sequence-parallel region)."""
    return x if tp_size(group) == 1 else _ScatterToSequenceRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, tensor_parallel_output_grad: bool = True):
    """[b, s/tp, h] -> [b, s, h] on every rank. The backward reduce-scatters the gradient (each rank's consumer
    computed a partial one, as column-parallel linears do), or only takes this rank's chunk when
    tensor_parallel_output_grad=False (the gradient is already the full one on every rank)."""
    return x if tp_size(group) == 1 else _GatherFromSequenceRegion.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial sums [b, s, h] -> this rank's chunk of their sum [b, s/tp, h] (row-parallel output under SP)."""
    return x if tp_size(group) == 1 else _ReduceScatterToSequenceRegion.apply(x, group)
