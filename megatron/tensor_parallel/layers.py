"""Column/row-parallel linears and the vocab-parallel embedding (Megatron's tensor_parallel/layers.py).

Weights are initialised as the full ("master") matrix from the default generator and then cut, so a model built
with any tensor-parallel size from one seed holds the same numbers as the single-process model: TP=k checks against
TP=1 exactly, and `merge_partitions` puts the shards of a checkpoint back together.

A parameter that is sharded carries `tensor_model_parallel = True`, `partition_dim` (0: rows/output features,
1: columns/input features) and `partition_stride`; the rest (biases of row-parallel layers, LayerNorms) are
replicated, and their gradients are identical on every tensor-parallel rank.

Sequence parallelism (sequence_parallel=True, Megatron-LM's --sequence-parallel): the column-parallel input is
this rank's [b, s/tp, h] chunk, all-gathered along the sequence before the product (backward: reduce-scatter), and
the row-parallel output is reduce-scattered to [b, s/tp, h] in place of the all-reduce. Replicated parameters that
act on sequence chunks (norms, the row-parallel bias, MoE layers) then hold partial gradients: they are marked
`sequence_parallel = True` and `allreduce_sequence_parallel_grads` sums them over TP after the backward.
"""
from typing import Callable, Iterable, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.tensor_parallel.mappings import (copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                                               reduce_from_tensor_parallel_region,
                                               reduce_scatter_to_sequence_parallel_region, tp_rank, tp_size)


def divide(n: int, d: int, what: str) -> int:
    """n // d for a size split over d tensor-parallel ranks. The flags are checked once, before any module is
    built (megatron.arguments.validate); reaching here with a remainder is a caller's bug."""
    assert n % d == 0, f"{what} ({n}) is not divisible by the tensor-parallel size ({d})"
    return n // d


def partition(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's shard of `full` along `dim`. stride > 1: `dim` holds `stride` blocks (e.g. Q, K, V) and each
    rank takes its chunk of every block, so a fused [3·h, h] QKV weight is split by heads, not into Q | K | V."""
    n = full.shape[dim]
    if n % (stride * size) != 0:
        raise ValueError(f"dimension {dim} of size {n} cannot be split into {stride} x {size} parts")
    shape = list(full.shape)
    blocks = full.reshape(shape[:dim] + [stride, size, n // (stride * size)] + shape[dim + 1:])
    return blocks.select(dim + 1, rank).reshape(shape[:dim] + [n // size] + shape[dim + 1:]).clone()


def merge_partitions(shards: List[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `partition`: the full tensor from every rank's shard, in rank order."""
    size = len(shards)
    shape = list(shards[0].shape)
    n = shape[dim]
    parts = [s.reshape(shape[:dim] + [stride, 1, n // stride] + shape[dim + 1:]) for s in shards]
    full = torch.cat(parts, dim=dim + 1)
    return full.reshape(shape[:dim] + [n * size] + shape[dim + 1:])


def _mark(p: torch.nn.Parameter, dim: int, stride: int, size: int) -> torch.nn.Parameter:
    p.tensor_model_parallel = size > 1
    p.partition_dim = dim
    p.partition_stride = stride
    return p


def is_tensor_parallel_param(p: torch.nn.Parameter) -> bool:
    """True for a parameter sharded over the tensor-parallel group (its grad norm is summed over that group)."""
    return bool(getattr(p, "tensor_model_parallel", False))


def _sharded_param(rows: int, cols: int, dim: int, stride: int, group, init_method: Callable) -> torch.nn.Parameter:
    full = torch.empty(rows, cols)
    init_method(full)
    size = tp_size(group)
    local = full if size == 1 else partition(full, dim, tp_rank(group), size, stride)
    return _mark(torch.nn.Parameter(local), dim, stride, size)


class ColumnParallelLinear(torch.nn.Module):
    """Y = X A^T + b with A [out, in] split by rows (output features): each rank computes its slice of Y.

    The input enters the parallel region (backward all-reduces its gradient); each rank keeps its [..., out / tp]
    slice of Y for a following RowParallelLinear.
    stride: the output features are `stride` equal blocks split separately (fused QKV: 3).
    """

    def __init__(self, in_features: int, out_features: int, group, init_method: Callable, bias: bool = True,
                 stride: int = 1, what: str = "output features", sequence_parallel: bool = False,
                 input_in_region: bool = False):
        super().__init__()
        self.group = group
        self.sequence_parallel = sequence_parallel and tp_size(group) > 1
        # the caller has already entered the parallel region (gathered the sequence once for several consumers,
        # as MLA under SP): no collective here, and this layer's input gradient stays this rank's partial sum
        self.input_in_region = input_in_region
        size = tp_size(group)
        divide(out_features, size * stride, what)
        self.weight = _sharded_param(out_features, in_features, 0, stride, group, init_method)
        self.bias = None
        if bias:
            self.bias = _mark(torch.nn.Parameter(torch.zeros(out_features // size)), 0, stride, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_in_region:
            return F.linear(x, self.weight, self.bias)
        if self.sequence_parallel:  # [b, s/tp, h] -> [b, s, h]; the backward reduce-scatters the input gradient
            return F.linear(gather_from_sequence_parallel_region(x, self.group), self.weight, self.bias)
        return F.linear(copy_to_tensor_parallel_region(x, self.group), self.weight, self.bias)


class RowParallelLinear(torch.nn.Module):
    """Y = X A^T + b with A [out, in] split by columns (input features): each rank multiplies its slice of X
    (already split when input_is_parallel, as a ColumnParallelLinear leaves it) and the partial products are
    all-reduced; the bias is replicated and added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, group, init_method: Callable, bias: bool = True,
                 what: str = "input features", sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        size = tp_size(group)
        self.sequence_parallel = sequence_parallel and size > 1
        divide(in_features, size, what)
        self.weight = _sharded_param(out_features, in_features, 1, 1, group, init_method)
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None and self.sequence_parallel:  # added to this rank's sequence chunk only
            self.bias.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # partial sums [b, s, h] -> this rank's chunk of the sum [b, s/tp, h]
            y = reduce_scatter_to_sequence_parallel_region(F.linear(x, self.weight), self.group)
        else:
            y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding whose rows (the vocabulary) are split over the tensor-parallel group: each rank looks up the ids
    in its range [start, end), zeros the rest, and the partial embeddings are all-reduced. Its weight doubles as
    the tied LM head: logits for this rank's vocabulary slice are x @ weight^T."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group, init_method: Callable):
        super().__init__()
        self.group = group
        size = tp_size(group)
        per_rank = divide(num_embeddings, size, "padded vocabulary size")
        self.vocab_start = tp_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.num_embeddings = num_embeddings
        self.weight = _sharded_param(num_embeddings, embedding_dim, 0, 1, group, init_method)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)


def parallel_lm_logits(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """This rank's vocabulary slice of the logits against a vocab-parallel head weight (the input enters the
    tensor-parallel region, so its gradient is summed over the ranks)."""
    return F.linear(copy_to_tensor_parallel_region(x, group), weight)


def mark_sequence_parallel(params: Iterable[torch.nn.Parameter]) -> None:
    """Marks replicated parameters that see only this rank's sequence chunk (their gradients are partial sums)."""
    for p in params:
        p.sequence_parallel = True


def is_sequence_parallel_param(p: torch.nn.Parameter) -> bool:
    return bool(getattr(p, "sequence_parallel", False))


def allreduce_sequence_parallel_grads(model: torch.nn.Module, group) -> None:
    """After the backward (before the data-parallel reduction; both are sums, so the order does not matter), sums
    the gradients of the parameters marked sequence_parallel over the TP group (Megatron-LM's
    _allreduce_layernorm_grads / sequence-parallel grads in finalize_model_grads)."""
    if tp_size(group) <= 1:
        return
    sum_grads_over([p for p in model.parameters() if p.requires_grad and is_sequence_parallel_param(p)], group)


def sum_grads_over(params: List[torch.nn.Parameter], group) -> None:
    """Sums the gradients of `params` over `group`, one flat all-reduce per dtype. A parameter without a gradient
    on this rank (an expert no local token reached) joins with zeros, so every rank sends the same sizes; one
    without a gradient on every rank keeps None, as it would without the split."""
    if not params or tp_size(group) <= 1:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    params = [p for p, h in zip(params, has.tolist()) if h]
    by_dtype = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
