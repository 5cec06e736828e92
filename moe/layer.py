"""`MoELayer`: router + dispatch + experts (+ shared expert), local and expert-parallel paths side by side.
The DeepSpeed-compatible `MoE` wrapper is moe/deepspeed_compat.py.

Shape legend: B batch, S sequence, T = tokens on this rank, D hidden, F ffn hidden, E experts (global),
e local experts, N kept (token, choice) pairs sent, R rows received by this rank's experts, P ep_size.
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe import dispatch
from moe.config import MoEConfig
from moe.experts import MLP, GroupedMLPExperts, ModuleExperts, _autocast_on, compute_dtype
from moe.gating import Routing, TopKRouter


class MoEStats(NamedTuple):
    """Per-call router statistics of one MoE layer.

    aux_loss: differentiable fp32 scalar, GShard load-balancing loss, NOT multiplied by loss_coeff.
    z_loss: differentiable fp32 scalar (0 when cfg.z_loss_coeff == 0), NOT multiplied by z_loss_coeff.
    tokens_per_expert: int64 [E], pairs this rank routed to each (global) expert before dropping; detached.
    dropped_fraction: fp32 scalar, fraction of this rank's (token, choice) pairs dropped; detached.
    """
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor


class ResidualMix(nn.Module):
    """Residual-MoE (DeepSpeed-MoE, Rajbhandari et al. 2022): a dense MLP beside the MoE, mixed per token.

    coef_T2 = softmax(coefficient(x_TD)); y_TD = moe_TD · coef_T2[:, 0:1] + mlp(x_TD) · coef_T2[:, 1:2]
    (DeepSpeed's `use_residual` convention: column 0 weighs the MoE output). The MLP and the 2-way
    coefficient Linear are dense parameters (replicated, reduced over data parallel); no communication.
    The coefficient Linear keeps nn.Linear's default init, as DeepSpeed's.

    Args:
        mlp: the dense branch, [T, D] -> [T, D] (or a tuple whose first item is that, DeepSpeed style).
        hidden_size: D.
    """

    def __init__(self, mlp: nn.Module, hidden_size: int):
        super().__init__()
        self.mlp = mlp
        self.coefficient = nn.Linear(hidden_size, 2)

    def coefficients(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, 2] mixing weights in (0, 1), each row summing to 1."""
        return torch.softmax(self.coefficient(x_TD), dim=-1)

    def forward(self, x_TD: torch.Tensor, moe_TD: torch.Tensor) -> torch.Tensor:
        mlp_TD = self.mlp(x_TD)
        if isinstance(mlp_TD, tuple):
            mlp_TD = mlp_TD[0]
        coef_T2 = self.coefficients(x_TD)
        return (moe_TD * coef_T2[:, 0:1] + mlp_TD * coef_T2[:, 1:2]).to(moe_TD.dtype)  # autocast may widen


class SharedExpert(nn.Module):
    """Shared expert(s) (DeepSeek-MoE, Qwen2-MoE, Megatron-LM's --moe-shared-expert-intermediate-size): one dense
    MLP of that width computed for every token beside the routed experts and added to their output; with
    `gated` (Qwen2-MoE's shared_expert_gate) scaled per token by sigmoid(x · w_gate), w_gate [1, D] without bias.
    Dense parameters (replicated over EP, reduced over DP like the router); no communication."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, gated: bool,
                 init_method: Optional[Callable] = None, output_layer_init_method: Optional[Callable] = None,
                 bias: bool = True):
        super().__init__()
        self.mlp = MLP(hidden_size, ffn_hidden_size, activation, init_method, output_layer_init_method, bias=bias)
        self.gate = None
        if gated:
            self.gate = nn.Linear(hidden_size, 1, bias=False)
            if init_method is not None:
                with torch.no_grad():
                    init_method(self.gate.weight)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.mlp(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD


class MoELayer(nn.Module):
    """Mixture-of-Experts MLP: y = Σ_k gate_k · expert_{e_k}(x) per token (0 for dropped choices).

    With cfg.mlp_type == 'residual' (Residual-MoE) the result is mixed with a dense MLP of the expert's
    shape (moe.experts.MLP, or a copy of the user `expert`) by a learned per-token 2-way softmax: see ResidualMix.

    Args:
        hidden_size, ffn_hidden_size: D and F of the built-in MLP experts.
        num_experts: E, experts in this layer (global); each EP rank holds e = E / ep_size of them,
            global ids [ep_rank*e, (ep_rank+1)*e).
        cfg: MoEConfig (topk, capacity factors, dropping, noise, z-loss, mlp_type).
        ep_group: expert-parallel process group; None means ep_size 1. Its size must be one of cfg.ep_size
            (the caller picks this layer's entry: cfg.ep_size_for_layer(i)).
        init_method / output_layer_init_method: fill a weight in place; applied to the router weight
            and each expert's fc1 (init_method) and fc2 (output_layer_init_method) slice.
        expert: optional user module, deep-copied once per local expert instead of the built-in MLP.
        activation: the built-in experts' (and Residual-MoE branch's) activation when cfg.expert_activation is
            None: the model passes its dense MLP's, so one expert is the model's MLP.
        dp_group: data-parallel group, for the router's global_aux_loss counts (TopKRouter); None = one rank.
        bias: biases in the built-in experts and the shared expert (False: --disable-bias-linear).
        etp_group: expert-tensor-parallel group (--expert-tensor-parallel-size; None: 1): each expert's FFN split
            over its ranks (GroupedMLPExperts etp_size), partial outputs summed over it (forward_folded).
        dedup_group: the TP group when its ranks hold the same tokens (TP > 1 without --sequence-parallel) and the
            experts are on the folded grid: each rank dispatches 1/TP of the tokens, outputs all-gathered back.
        expert_grid: the experts are laid out on the folded expert grid (megatron/parallel_state.py), not
            replicated over TP / CP (None: whenever etp_group or dedup_group is given); their parameters carry
            expert_folded=True, so the caller neither sums their gradients over TP / CP nor skips their files there.
    With cfg.shared_expert_ffn_hidden_size a SharedExpert of that width runs beside the routed experts.
        pad_to_capacity: capacity mode, single rank: run every expert on exactly C rows (empty slots computed and
            discarded) so no shape depends on the routing: no host sync. None = on for CUDA inputs with resident
            experts. The EP path always sends real rows only (its one sync sizes the all-to-all anyway).
        grouped_mm, cpu_fast_paths: the built-in experts' GEMM choices (GroupedMLPExperts).
    Communication: with ep_size > 1, forward runs one all_to_all of counts and two variable-size
    all_to_all_single of tokens over ep_group; backward runs the two token all-to-alls in reverse.
    On the folded expert grid (etp_group / dedup_group) see forward_folded: a TP all-gather of the outputs, ETP
    gathers of rows and returns of partial sums, and the EP all-to-alls in between.
    The layer never all-reduces gradients.

    Gradient scaling (for the caller's reduction): with DP ranks = D, ep_size = N (EP splits DP, so the
    expert-data-parallel group has D/N ranks) and each rank backpropagating its own loss_r (a mean over
    its local tokens), an expert parameter's .grad on a rank is the SUM over the tokens it received from
    all N EP peers. To equal single-process training on the whole batch (loss = mean_r loss_r):
    dense params (router and Residual-MoE branch included): all-reduce SUM over DP, divide by D (the usual
    DP average);
    expert params: all-reduce SUM over expert-DP, divide by D as well (not by D/N).
    tests/dist/test_moe_ep.py checks this for D = N = 2.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, cfg: MoEConfig,
                 ep_group=None, init_method: Optional[Callable] = None,
                 output_layer_init_method: Optional[Callable] = None, expert: Optional[nn.Module] = None,
                 activation: str = "gelu_tanh", bias: bool = True, dp_group=None,
                 pad_to_capacity: Optional[bool] = None, grouped_mm: Optional[str] = None,
                 cpu_fast_paths: Optional[bool] = None, etp_group=None, dedup_group=None,
                 expert_grid: Optional[bool] = None):
        super().__init__()
        activation = cfg.expert_activation or activation
        # capacity mode: give every expert exactly C rows (Megatron-LM's --moe-pad-expert-input-to-capacity), so no
        # size depends on the routing and the layer needs no host sync; None = on CUDA only (on CPU, computing the
        # empty slots would cost more than the sync-free shapes save)
        self.pad_to_capacity = cfg.pad_to_capacity if pad_to_capacity is None else pad_to_capacity
        ep_size = 1 if ep_group is None else ep_group.size()
        # MoEConfig checked the flags (experts divisible by EP, 1 <= topk <= experts) for each of its MoE layers;
        # the layer only checks that it is built as one of them
        if ep_size not in cfg.ep_size:
            given = cfg.ep_size[0] if len(cfg.ep_size) == 1 else list(cfg.ep_size)
            raise ValueError(f"--moe-expert-parallel-size ({given}) does not match the size of the "
                             f"ep_group passed to MoELayer ({ep_size}); ep_group=None means size 1")
        layers = range(max(len(cfg.num_experts), len(cfg.ep_size)))
        if (num_experts, ep_size) not in {(cfg.num_experts_for_layer(i), cfg.ep_size_for_layer(i)) for i in layers}:
            raise ValueError(f"MoELayer(num_experts={num_experts}) with an ep_group of {ep_size} rank(s) is not a MoE "
                             f"layer of its MoEConfig (--num-experts {list(cfg.num_experts)}, "
                             f"--moe-expert-parallel-size {list(cfg.ep_size)})")
        self.hidden_size, self.num_experts, self.cfg = hidden_size, num_experts, cfg
        self.layer_index: Optional[int] = None  # position among the model's MoE layers (set by the model builder)
        self.ep_group, self.ep_size = ep_group, ep_size
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        self.num_local_experts = num_experts // ep_size
        self.etp_group, self.dedup_group = etp_group, dedup_group
        self.etp_size = 1 if etp_group is None else etp_group.size()
        if self.etp_size > 1 and expert is not None:
            raise ValueError(f"--expert-tensor-parallel-size ({self.etp_size}) splits the built-in MLP experts only; "
                             f"a user `expert` module cannot be split: use 1 or drop `expert`")
        self.router = TopKRouter(cfg, hidden_size, init_method, num_experts=num_experts, dp_group=dp_group)
        if expert is None:
            self.experts = GroupedMLPExperts(self.num_local_experts, hidden_size, ffn_hidden_size,
                                             init_method, output_layer_init_method,
                                             first_expert=self.ep_rank * self.num_local_experts,
                                             num_experts=num_experts, activation=activation, bias=bias,
                                             grouped_mm=grouped_mm, cpu_fast_paths=cpu_fast_paths,
                                             etp_size=self.etp_size,
                                             etp_rank=0 if etp_group is None else dist.get_rank(etp_group))
        else:
            self.experts = ModuleExperts(expert, self.num_local_experts)
        self.expert_grid = (etp_group is not None or dedup_group is not None) if expert_grid is None else expert_grid
        for p in self.experts.parameters():
            p.ep_size = ep_size  # the caller reduces each expert grad over the expert-DP group of this EP size
            p.expert_folded = self.expert_grid  # not TP/CP replicas (megatron/context_parallel.py)
        self.residual = None
        if cfg.mlp_type == "residual":
            mlp = (MLP(hidden_size, ffn_hidden_size, activation, init_method, output_layer_init_method)
                   if expert is None else copy.deepcopy(expert))
            self.residual = ResidualMix(mlp, hidden_size)
        self.shared_expert = None
        if cfg.shared_expert_ffn_hidden_size is not None:
            self.shared_expert = SharedExpert(hidden_size, cfg.shared_expert_ffn_hidden_size, activation,
                                              cfg.shared_expert_gate, init_method, output_layer_init_method, bias)

    def forward(self, x: torch.Tensor):
        """x: [..., D] (e.g. [B, S, D] or [T, D]) -> (y of x's shape, MoEStats).

        y's dtype is the experts' compute dtype (the autocast dtype under autocast, as nn.Linear's output; else the
        weights' dtype). Host syncs (on CUDA): none in capacity mode with padding (pad_to_capacity); otherwise one,
        the copy of the split sizes (dispatch.counts_to_host).
        """
        x_TD = x.reshape(-1, self.hidden_size)
        routing = self.router(x_TD, num_sequences=x.shape[0] if x.dim() == 3 else 1)  # [B, S, D]: B sequences
        x_TD_c = self._to_compute_dtype(x_TD)  # cast before dispatch: the all-to-all carries the compute dtype
        if self.etp_group is not None or self.dedup_group is not None:
            y_TD = self.forward_folded(x_TD_c, routing)
        elif self.ep_size == 1:
            y_TD = self.forward_local(x_TD_c, routing)
        else:
            y_TD = self.forward_ep(x_TD_c, routing)
        return self._finish(x, x_TD, routing, y_TD)

    def _to_compute_dtype(self, x_TD: torch.Tensor) -> torch.Tensor:
        if isinstance(self.experts, GroupedMLPExperts):
            return x_TD.to(compute_dtype(x_TD, self.experts.w1_eFD))
        if x_TD.dtype == torch.float32 and _autocast_on(x_TD.device.type):  # user experts: autocast's dtype
            return x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        return x_TD

    def _run_experts(self, tokens_ND: torch.Tensor, counts, counts_e: torch.Tensor) -> torch.Tensor:
        if isinstance(self.experts, (GroupedMLPExperts, ModuleExperts)):
            return self.experts(tokens_ND, counts, counts_e=counts_e)
        return self.experts(tokens_ND, counts)  # e.g. offloaded experts: host counts only

    def _padded(self, x_TD: torch.Tensor, routing: Routing) -> bool:
        """Padded capacity dispatch (single rank; EP exchanges only real rows)? Auto: CUDA, resident experts
        (offloaded experts fetch only the experts that have rows, so they keep the compact dispatch)."""
        if routing.capacity is None:
            return False
        if self.pad_to_capacity is None:
            return x_TD.device.type == "cuda" and isinstance(self.experts, (GroupedMLPExperts, ModuleExperts))
        return self.pad_to_capacity

    def _finish(self, x: torch.Tensor, x_TD: torch.Tensor, routing: Routing, y_TD: torch.Tensor):
        """The residual mix (Residual-MoE), the shared expert and the stats: (y of x's shape, MoEStats)."""
        if self.residual is not None:
            y_TD = self.residual(x_TD, y_TD)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD).to(y_TD.dtype)
        stats = MoEStats(routing.aux_loss, routing.z_loss, routing.tokens_per_expert_E,
                         routing.dropped_fraction)
        return y_TD.view(x.shape), stats

    def _kept_pairs(self, routing: Routing, counts) -> torch.Tensor:
        """The [N] kept pairs grouped by expert (the slot table compacted when there is a capacity)."""
        if routing.capacity is None:
            return routing.pair_idx_N
        return dispatch.compact_slots(routing.pair_idx_N, sum(counts), routing.expert_TK.numel())

    def forward_many(self, xs):
        """[forward(x) for x in xs], with every micro-batch routed on its own (capacity, dropping and results as
        in forward) and the experts applied to all of them in one pass, so an offloaded expert is fetched once
        for the whole list (layer-major scoring). Single-rank inference only."""
        if self.ep_size != 1:
            raise ValueError("MoELayer.forward_many runs on one rank (ep_size 1)")
        flat = [x.reshape(-1, self.hidden_size) for x in xs]
        routings = [self.router(x_TD, num_sequences=x.shape[0] if x.dim() == 3 else 1)
                    for x, x_TD in zip(xs, flat)]
        all_counts = dispatch.counts_to_host(*[r.counts_E for r in routings])
        pairs = [self._kept_pairs(r, c) for r, c in zip(routings, all_counts)]
        jobs = [(dispatch.permute_tokens(self._to_compute_dtype(x_TD), r, p), c)
                for x_TD, r, p, c in zip(flat, routings, pairs, all_counts)]
        many = getattr(self.experts, "forward_many", None)
        ys = many(jobs) if many is not None else [self._run_experts(t, c, r.counts_E)
                                                  for (t, c), r in zip(jobs, routings)]
        return [self._finish(x, x_TD, routing, dispatch.unpermute_tokens(y_ND, routing, x_TD.shape[0], p))
                for x, x_TD, routing, y_ND, p in zip(xs, flat, routings, ys, pairs)]

    def forward_local(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Single-rank path: permute -> experts -> unpermute/combine.

        Capacity mode with padding: every expert gets exactly C rows (the slot table; empty slots are filler rows
        whose outputs are discarded), so all sizes are known on the host: no sync. Otherwise the kept rows only,
        sized by one host copy of the counts (dispatch.counts_to_host), as Megatron-LM's dropless path.
        """
        if self._padded(x_TD, routing):
            e, c = self.num_local_experts, routing.capacity
            tokens_SD = dispatch.permute_tokens(x_TD, routing, padded=True)
            counts_e = torch.full((e,), c, dtype=torch.int64, device=x_TD.device)
            y_SD = self._run_experts(tokens_SD, [c] * e, counts_e)
            return dispatch.unpermute_tokens(y_SD, routing, x_TD.shape[0], padded=True)
        (counts,) = dispatch.counts_to_host(routing.counts_E)  # the one host sync
        pair_idx_N = self._kept_pairs(routing, counts)
        tokens_ND = dispatch.permute_tokens(x_TD, routing, pair_idx_N)
        y_ND = self._run_experts(tokens_ND, counts, routing.counts_E)
        return dispatch.unpermute_tokens(y_ND, routing, x_TD.shape[0], pair_idx_N)

    def forward_ep(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Expert-parallel path over ep_group.

        1. all_to_all the per-expert counts, so each rank knows its receive sizes (no global capacity);
        2. ONE device->host copy of the send and receive counts (the layer's one host sync): every split size;
        3. local prep: gather kept pairs grouped by global expert (experts of rank p are contiguous);
        4. all_to_all_single the rows (variable splits, in the compute dtype);
        5. regroup received rows from (source rank, local expert) to (local expert, source rank) order;
        6. expert compute;
        7. undo step 5, all_to_all_single the outputs back, and combine with the gates.
        Backward mirrors steps 4 and 7 with the reversed splits.
        """
        group = self.ep_group
        recv_counts_Pe = dispatch.exchange_counts(routing.counts_E, group)
        counts, recv_counts = dispatch.counts_to_host(routing.counts_E, recv_counts_Pe)
        send_splits, recv_splits, counts_e = dispatch.ep_splits(counts, recv_counts, self.ep_size)
        pair_idx_N = self._kept_pairs(routing, counts)
        tokens_ND = dispatch.permute_tokens(x_TD, routing, pair_idx_N)
        recv_RD = dispatch.dispatch_ep(tokens_ND, send_splits, recv_splits, group)
        rows_RD, perm = dispatch.group_by_local_expert(recv_RD, recv_counts_Pe)
        y_RD = self._run_experts(rows_RD, counts_e, recv_counts_Pe.sum(dim=0))
        y_ND = dispatch.combine_ep(dispatch.regroup_by_source_rank(y_RD, perm), send_splits, recv_splits, group)
        return dispatch.unpermute_tokens(y_ND, routing, x_TD.shape[0], pair_idx_N)

    def forward_folded(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Expert path on the folded grid: token de-duplication over TP, EP all-to-all, expert tensor parallelism.

        1. de-dup (dedup_group): this TP rank keeps its token slice [start, stop) and the kept pairs of it (the
           routing of all T tokens is the same on every TP rank, so drops, aux loss and statistics are those of
           ETP = 1); the slice's per-expert counts are computed on the device;
        2. EP (ep_size > 1): all_to_all the counts; ETP: all_gather every ETP peer's per-local-expert counts;
        3. ONE device->host copy of all of them (the layer's one host sync, as forward_ep);
        4. local prep: the slice's kept pairs grouped by expert, their rows gathered;
        5. EP all_to_all of the rows, regrouped by local expert;
        6. ETP: the rows of every ETP peer gathered (dispatch.etp_gather_rows), regrouped by local expert;
        7. experts: this rank's F-slice of every local expert -> partial outputs;
        8. ETP: partial outputs back to their owners and summed (dispatch.etp_reduce_rows);
        9. EP all_to_all back, combine with the gates;
        10. all_gather the slices' outputs over TP (de-dup's inverse).
        Backward mirrors each step (the slice's backward all-gathers the input and gate gradients).
        """
        num_tokens, k = routing.expert_TK.shape
        if self.dedup_group is not None:  # 1.
            start, stop = dispatch.token_slice(num_tokens, self.dedup_group.size(), dist.get_rank(self.dedup_group))
            cand, mine, counts_E = dispatch.slice_candidates(routing, start, stop)
            x_TD = dispatch.slice_tokens(x_TD, start, stop, self.dedup_group)
        else:
            start, stop, counts_E = 0, num_tokens, routing.counts_E
        recv_Pe = dispatch.exchange_counts(counts_E, self.ep_group) if self.ep_size > 1 else None  # 2.
        local_e = recv_Pe.sum(dim=0) if recv_Pe is not None else counts_E
        peers_Qe = dispatch.etp_gather_counts(local_e, self.etp_group) if self.etp_size > 1 else None
        host = dispatch.counts_to_host(*[c for c in (counts_E, recv_Pe, peers_Qe) if c is not None])  # 3.
        counts = host[0]
        if self.dedup_group is not None:  # 4.
            pair_idx_N = dispatch.mine_pairs(cand, mine, sum(counts), start, k)
            routing = routing._replace(pair_idx_N=pair_idx_N, counts_E=counts_E, capacity=None,
                                       expert_TK=routing.expert_TK[start:stop],
                                       gates_TK=dispatch.slice_tokens(routing.gates_TK, start, stop,
                                                                      self.dedup_group))
        else:
            pair_idx_N = self._kept_pairs(routing, counts)
        rows_ND = dispatch.permute_tokens(x_TD, routing, pair_idx_N)
        counts_e, perm = counts, None
        if recv_Pe is not None:  # 5.
            send_splits, recv_splits, counts_e = dispatch.ep_splits(counts, host[1], self.ep_size)
            rows_ND, perm = dispatch.group_by_local_expert(
                dispatch.dispatch_ep(rows_ND, send_splits, recv_splits, self.ep_group), recv_Pe)
        y_ND = self._run_experts_etp(rows_ND, counts_e, local_e, peers_Qe, host[-1])  # 6.-8.
        if recv_Pe is not None:  # 9.
            y_ND = dispatch.combine_ep(dispatch.regroup_by_source_rank(y_ND, perm), send_splits, recv_splits,
                                       self.ep_group)
        y_TD = dispatch.unpermute_tokens(y_ND, routing, stop - start, pair_idx_N)
        if self.dedup_group is not None:  # 10.
            y_TD = dispatch.gather_tokens(y_TD, num_tokens, start, stop, self.dedup_group)
        return y_TD

    def _run_experts_etp(self, rows_RD, counts_e, counts_e_dev, peers_Qe, peers_host) -> torch.Tensor:
        """The local experts on this rank's rows grouped by local expert; under ETP on every peer's rows, this
        rank's partial outputs summed with the peers' (steps 6-8 of forward_folded)."""
        if peers_Qe is None:
            return self._run_experts(rows_RD, counts_e, counts_e_dev)
        e = self.num_local_experts
        peer_rows = [sum(peers_host[q * e:(q + 1) * e]) for q in range(self.etp_size)]
        all_MD, perm = dispatch.group_by_local_expert(
            dispatch.etp_gather_rows(rows_RD, peer_rows, self.etp_group), peers_Qe)
        total_e = [sum(peers_host[q * e + j] for q in range(self.etp_size)) for j in range(e)]
        partial_MD = self._run_experts(all_MD, total_e, peers_Qe.sum(dim=0))
        return dispatch.etp_reduce_rows(dispatch.regroup_by_source_rank(partial_MD, perm), peer_rows,
                                        rows_RD.shape[0], self.etp_group)
