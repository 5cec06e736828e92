"""Tensor (intra-layer) model parallelism: Megatron's column/row-parallel linears, vocab-parallel embedding and
cross entropy, the autograd collectives they are built from, and the RNG tracker for dropout on sharded activations.

Every piece takes the tensor-parallel process group it uses (None or a 1-rank group: plain single-process math).
"""
from megatron.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             allreduce_sequence_parallel_grads, is_sequence_parallel_param,
                                             is_tensor_parallel_param, mark_sequence_parallel, merge_partitions,
                                             partition)
from megatron.tensor_parallel.mappings import (copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                                               gather_from_tensor_parallel_region,
                                               reduce_from_tensor_parallel_region,
                                               reduce_scatter_to_sequence_parallel_region,
                                               scatter_to_sequence_parallel_region, tp_rank, tp_size)
from megatron.tensor_parallel.random import TensorParallelRNGTracker, checkpoint

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region",
           "gather_from_tensor_parallel_region", "tp_rank", "tp_size",
           "TensorParallelRNGTracker", "checkpoint", "is_tensor_parallel_param", "partition", "merge_partitions",
           "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
           "reduce_scatter_to_sequence_parallel_region", "mark_sequence_parallel", "is_sequence_parallel_param",
           "allreduce_sequence_parallel_grads"]
