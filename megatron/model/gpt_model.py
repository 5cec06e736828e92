"""GPTModel: embeddings, L transformer layers, final norm, LM head (tied to the embedding, or its own weight with
--untie-embeddings-and-output-weights) and per-token cross entropy.

With tensor parallelism (groups.tp_group of size > 1) the embedding and the LM head are vocab-parallel: each
rank holds V/tp rows, computes logits for its vocabulary slice only, and the loss is the vocab-parallel cross
entropy; logits are gathered only when asked for.

With --sequence-parallel (groups.sequence_parallel, TP > 1) the embedding output is scattered along the sequence
(each TP rank keeps [b, s/tp, h]), the layers run on chunks (megatron/model/transformer.py) and the final norm's
output is all-gathered for the head (backward: reduce-scatter, in place of the head input's all-reduce).

With --context-parallel-size N (groups.cp_group) each CP rank runs its load-balanced chunks (2N chunks of the
sequence, rank i keeps i and 2N-1-i: megatron/context_parallel.py) through the whole model at their global
positions, attention reading the all-gathered keys/values; the per-token loss (and logits) are all-gathered back
to [b, s] in natural order, so callers see the CP=1 outputs.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.config import ModelConfig
from megatron.context_parallel import gather_sequence, local_indices
from megatron.errors import ConfigError
from megatron.model.attention import KVCache
from megatron.model.fused_lm_loss import DistillTarget, fused_lm_cross_entropy, fused_lm_kd_loss
from megatron.model.init_methods import init_method_normal, scaled_init_method_normal
from megatron.model.norms import build_norm
from megatron.model.rope import RotaryEmbedding
from megatron.model.transformer import TransformerLayer, context_parallel_group, run_layers, sequence_parallel
from megatron.tensor_parallel import (ColumnParallelLinear, TensorParallelRNGTracker, VocabParallelEmbedding,
                                      copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                                      gather_from_tensor_parallel_region, mark_sequence_parallel,
                                      scatter_to_sequence_parallel_region, tp_rank, tp_size,
                                      vocab_parallel_cross_entropy)
from megatron.tensor_parallel.layers import parallel_lm_logits


class ModelOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # [b, s, V] (None when labels were given and logits not requested)
    loss: Optional[torch.Tensor]  # per-token cross entropy [b, s] in fp32 (None without labels)
    moe_stats: List  # one entry per MoE layer (moe.MoEStats), empty for a dense model
    kd_total: Optional[torch.Tensor] = None  # with a distill_target: alpha·lm + beta·T²·mean KL (scalar, differentiable)
    kl: Optional[torch.Tensor] = None  # with a distill_target: per-token KL(teacher || student) [b, s], no gradient


class LayerStack(torch.nn.Module):
    """A pipeline stage's layers under their global indices (parameter names `<global index>.`), read in order as
    a list: len(), iteration and positional indexing/slicing as nn.ModuleList's."""

    def __init__(self, layers: Dict[int, torch.nn.Module]):
        super().__init__()
        for i in sorted(layers):
            self.add_module(str(i), layers[i])

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    @property
    def global_ids(self) -> List[int]:
        return [int(k) for k in self._modules]


class GPTModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg=None, groups=None, layer_ids: Optional[Sequence[int]] = None,
                 pre_process: bool = True, post_process: bool = True):
        """layer_ids / pre_process / post_process: one pipeline stage's part (megatron/pipeline): only the global
        layers `layer_ids` (None: all), the embedding when pre_process, the final norm and head when post_process
        (the word embedding too, as the tied head's weight). Every part is still built in order and the unused
        ones dropped, so the random initialisation of each kept parameter equals the whole model's; the layers keep
        their global indices in parameter names (`layers.<global index>.`), so checkpoints match the whole model."""
        super().__init__()
        self.cfg = cfg
        init = init_method_normal(cfg.init_method_std)
        out_init = scaled_init_method_normal(cfg.init_method_std, cfg.num_layers)
        self.tp_group = groups.tp_group if groups is not None else None
        # dropout on sharded activations (attention on this rank's heads) draws from its own per-rank stream
        self.rng_tracker = (TensorParallelRNGTracker(torch.initial_seed(), tp_rank(self.tp_group))
                            if tp_size(self.tp_group) > 1 else None)
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, self.tp_group, init)
        self.position_embeddings = None
        self.rotary = None
        if cfg.position_embedding_type == "learned_absolute":
            self.position_embeddings = torch.nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
            init(self.position_embeddings.weight)
        elif cfg.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_base)
        if layer_ids is None:
            self.layers = torch.nn.ModuleList(
                TransformerLayer(cfg, i, init, out_init, moe_cfg, groups, self.rng_tracker)
                for i in range(cfg.num_layers))
        else:  # built one at a time and dropped unless held: the RNG stream (and the init) of the whole model
            keep = set(layer_ids)
            held = {}
            for i in range(cfg.num_layers):
                layer = TransformerLayer(cfg, i, init, out_init, moe_cfg, groups, self.rng_tracker)
                if i in keep:
                    held[i] = layer
            self.layers = LayerStack(held)
        self.final_layernorm = build_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        self.sequence_parallel = sequence_parallel(groups)
        self.cp_group = context_parallel_group(groups)
        if self.sequence_parallel:
            mark_sequence_parallel(self.final_layernorm.parameters())
        self.output_layer = None  # untied head: [V/tp, h] rows of this rank's vocabulary slice, as the embedding
        if cfg.untie_embeddings_and_output_weights:
            self.output_layer = ColumnParallelLinear(cfg.hidden_size, cfg.padded_vocab_size, self.tp_group, init,
                                                     bias=False, what="padded vocabulary size")
        self.pre_process, self.post_process = pre_process, post_process
        if not post_process:
            self.final_layernorm = self.output_layer = None
        if not pre_process:
            self.position_embeddings = None
            if not (post_process and self.output_layer is None):  # the tied head keeps the word embedding
                self.word_embeddings = None

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head's weight [V/tp, h]: the word embedding's (tied, the default) or output_layer's."""
        return self.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        if self.sequence_parallel:  # this rank's chunk [b, s/tp, h]; dropout masks differ between the chunks
            x = scatter_to_sequence_parallel_region(x, self.tp_group)
            if self.training and self.cfg.hidden_dropout > 0:
                with self.rng_tracker.fork(x.device):
                    return F.dropout(x, self.cfg.hidden_dropout, self.training)
        return F.dropout(x, self.cfg.hidden_dropout, self.training)

    def _head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm's output entering the vocab-parallel head, whose gradient is summed over TP: the
        all-reduce of copy_to_tensor_parallel_region, or under sequence parallelism the all-gather of the chunks
        (its backward reduce-scatters, giving each rank the summed gradient of its chunk)."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(x, self.tp_group)
        return copy_to_tensor_parallel_region(x, self.tp_group) if tp_size(self.tp_group) > 1 else x

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                return_logits: Optional[bool] = None, parallel_output: bool = False,
                distill_target: Optional[DistillTarget] = None) -> ModelOutput:
        """tokens [b, s] int64; labels [b, s] (optional) -> ModelOutput.

        With labels and a distill_target (MoS / KD training) the LM loss and the distillation KL are one fused
        head loss (megatron/model/fused_lm_loss.py): `kd_total` is the loss to back-propagate, `loss` the per-token
        cross entropy and `kl` the per-token KL, both without gradient; no logits are returned.

        With a kv_cache, positions continue from the cached length and the cache grows by s. With tensor
        parallelism, parallel_output=True returns this rank's vocabulary slice of the logits [b, s, V/tp] instead
        of gathering all of them (vocab-parallel losses such as the distillation KL use the slice).
        """
        if isinstance(self.layers, LayerStack):
            raise ValueError("this GPTModel is one pipeline stage (layer_ids given): run it through "
                             "megatron.pipeline.Pipeline, or build the whole model")
        if self.cp_group is not None:
            return self._forward_context_parallel(tokens, labels, position_ids, kv_cache, return_logits,
                                                  parallel_output, distill_target)
        return self._forward(tokens, labels, position_ids, kv_cache, return_logits, parallel_output, distill_target)

    def _forward_context_parallel(self, tokens, labels, position_ids, kv_cache, return_logits, parallel_output,
                                  distill_target) -> ModelOutput:
        """forward() on this CP rank's chunks; loss and logits gathered back to the whole sequence."""
        if kv_cache is not None or distill_target is not None:
            raise ValueError("--context-parallel-size > 1 is for LM training and scoring: build the model without "
                             "it for KV-cache decoding or distillation")
        b, s = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        n = tp_size(self.cp_group)
        idx = local_indices(s, torch.distributed.get_rank(self.cp_group), n, tokens.device)
        out = self._forward(tokens[:, idx], labels[:, idx] if labels is not None else None, position_ids[:, idx],
                            None, return_logits, parallel_output, None)

        def whole(t):  # every CP rank computes the same loss of the whole sequence: the gradient is complete
            return None if t is None else gather_sequence(t, 1, self.cp_group, reduce_grad=False)
        return out._replace(logits=whole(out.logits), loss=whole(out.loss))

    def _forward(self, tokens, labels, position_ids, kv_cache, return_logits, parallel_output,
                 distill_target) -> ModelOutput:
        b, s = tokens.shape
        if self.sequence_parallel and kv_cache is not None:
            raise ValueError("a KV cache (incremental decoding) needs a model built without --sequence-parallel")
        if position_ids is None:
            start = kv_cache.length if kv_cache is not None else 0
            if self.position_embeddings is not None and start + s > self.cfg.max_position_embeddings:
                raise ConfigError(f"sequence end {start + s} exceeds --max-position-embeddings "
                                 f"({self.cfg.max_position_embeddings})")
            position_ids = torch.arange(start, start + s, device=tokens.device).unsqueeze(0).expand(b, s)
        x = self.embed(tokens, position_ids)
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        x, stats = run_layers(self.layers, x, rotary, kv_cache, self.cfg, self.rng_tracker)
        if kv_cache is not None:
            kv_cache.length += s
        return self.head(x, labels, stats, return_logits, parallel_output, distill_target)

    def head(self, x: torch.Tensor, labels: Optional[torch.Tensor], stats: List = (),
             return_logits: Optional[bool] = None, parallel_output: bool = False,
             distill_target: Optional[DistillTarget] = None) -> ModelOutput:
        """The last layer's output [b, s, h] -> final norm, LM head and per-token loss (forward()'s tail; the
        last pipeline stage calls it alone)."""
        stats = list(stats)
        x = self.final_layernorm(x)
        if return_logits is None:
            return_logits = labels is None
        logits = loss = None
        if distill_target is not None:
            if labels is None:
                raise ValueError("a distill_target needs labels (it is a training loss)")
            x_par = self._head_input(x)
            total, ce, kl = fused_lm_kd_loss(x_par, self.output_weight, labels, distill_target, self.tp_group)
            return ModelOutput(None, ce, stats, kd_total=total, kl=kl)
        if tp_size(self.tp_group) > 1:
            if not return_logits:  # training: the fused loss over this rank's vocabulary slice
                x_par = self._head_input(x)
                loss = fused_lm_cross_entropy(x_par, self.output_weight, labels, self.tp_group)
                return ModelOutput(None, loss, stats)
            if self.sequence_parallel:  # whole sequences; parallel_lm_logits all-reduces the gradient itself
                x = gather_from_sequence_parallel_region(x, self.tp_group, tensor_parallel_output_grad=False)
            local = parallel_lm_logits(x, self.output_weight, self.tp_group)
            if labels is not None:
                loss = vocab_parallel_cross_entropy(local, labels, self.tp_group)
            logits = local if parallel_output else gather_from_tensor_parallel_region(local, self.tp_group)
            return ModelOutput(logits, loss, stats)
        if return_logits:
            logits = F.linear(x, self.output_weight)
        if labels is not None:
            if logits is None:  # training: never materialise log-probs (megatron/model/fused_lm_loss.py)
                loss = fused_lm_cross_entropy(x, self.output_weight, labels)
            else:
                b, s, v = logits.shape
                loss = F.cross_entropy(logits.float().view(b * s, v), labels.reshape(b * s),
                                       reduction="none").view(b, s)
        return ModelOutput(logits, loss, stats)

    def forward_layer_major(self, tokens_list: List[torch.Tensor]) -> List[torch.Tensor]:
        """Final-LayerNorm outputs [b, s, h] of several micro-batches, run layer by layer over the whole list.

        Equals [final_layernorm output of forward(t)] for each t (one process, no KV cache); an offloaded MoE
        layer then reads each expert once per list instead of once per micro-batch (FlexGen's block schedule).
        """
        if tp_size(self.tp_group) > 1:
            raise ValueError("layer-major scoring runs on one process (merge tensor-parallel shards first)")
        xs, rotaries = [], []
        for tokens in tokens_list:
            b, s = tokens.shape
            position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
            xs.append(self.embed(tokens, position_ids))
            rotaries.append(self.rotary(position_ids) if self.rotary is not None else None)
        for layer in self.layers:
            xs, _ = layer.forward_many(xs, rotaries)
        return [self.final_layernorm(x) for x in xs]

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)

