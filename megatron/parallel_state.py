"""Builds every process group once from (TP, CP, DP, PP, EP, ETP) and returns them as one frozen ParallelGroups.

Rank order (Megatron-LM's): TP fastest, then CP, then DP, then PP:
    rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP * pp_rank)),   world = TP x CP x DP x PP.
So a TP group is TP consecutive ranks (one node's GPUs first), CP groups stride TP, DP groups stride TP x CP and
PP groups stride TP x CP x DP. Groups built (each rank keeps the one it belongs to):
- tp_group   : same (cp, dp, pp) rank, TP ranks;        - cp_group: same (tp, dp, pp), CP ranks;
- dp_group   : same (tp, cp, pp), DP ranks;             - dp_cp_group: same (tp, pp), DP x CP ranks (the group
  dense gradients are reduced over when CP > 1: each CP rank holds other tokens of the same sequences);
- pp_group   : same (tp, cp, dp), PP ranks;          - tp_cp_group: same (dp, pp), TP x CP ranks;
- embedding_group (PP > 1): the first and last rank of each PP group (the tied embedding's two copies);
- per EP size: ep_group = EP consecutive ranks of this rank's DP group, expert_dp_group = the ranks of the DP group
  with the same slot in their EP chunk (EP x expert-DP = DP inside every (tp, cp, pp) slice; ETP = 1); with TP > 1
  and no sequence parallelism the TP ranks dispatch disjoint token slices, so expert_dp_group also spans the TP
  ranks (each TP replica of an expert saw other tokens).
With CP = PP = 1 every group is the one the project built before (TP, DP, EP, expert-DP; expert-DP spanning TP
since issue 27's token de-duplication), in the same creation order.

Expert grid (Megatron-LM's "MoE parallel folding", used when --expert-tensor-parallel-size > 1 or an EP size does
not divide DP): the experts lay the S = TP x CP x DP ranks of each pipeline stage out on their own grid, ETP fastest,
then EP, then expert-DP (EDP = S / (ETP x EP)), independent of the attention grid:
    stage rank s = tp_rank + TP * (cp_rank + CP * dp_rank) = etp_rank + ETP * (ep_rank + EP * edp_rank),
    rank = s + S * pp_rank.
- etp_group: same (ep, edp, pp), ETP consecutive ranks: one expert's FFN split column/row-parallel;
- ep_group: same (etp, edp, pp), EP ranks at stride ETP (may span TP, CP and DP ranks: EP folded over them);
- expert_dp_group: same (etp, ep, pp), EDP ranks at stride ETP x EP: replicas of one expert shard (each saw other
  tokens: TP ranks dispatch disjoint token slices, see moe/layer.py), gradients summed there;
- expert_mp_group: same (edp, pp), ETP x EP ranks: every expert shard once (the gradient norm is summed there).
Without folding (ETP = 1, every EP size dividing DP) the layout above (experts replicated over TP and CP, EP inside
the DP group) is kept, as existing checkpoints and launch scripts assume.
The pipeline schedules live in megatron/pipeline; EP groups (folded or not) lie inside one stage.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.errors import ConfigError


@dataclass(frozen=True)
class RankLayout:
    """The (TP, CP, DP, PP) grid of ranks, TP fastest: coordinates of a rank and the members of each group."""
    tp: int
    cp: int
    dp: int
    pp: int

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def coords(self, rank: int) -> Dict[str, int]:
        """{'tp', 'cp', 'dp', 'pp'} ranks of global `rank`."""
        out = {}
        for name in ("tp", "cp", "dp", "pp"):
            size = getattr(self, name)
            out[name], rank = rank % size, rank // size
        return out

    def rank(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def groups(self, vary: Sequence[str]) -> List[List[int]]:
        """Every group whose members differ only in the `vary` coordinates (e.g. ('tp',): the TP groups), each a
        sorted rank list; groups in order of their smallest rank, so every rank creates them in the same order."""
        seen: Dict[tuple, List[int]] = {}
        for r in range(self.world):
            c = self.coords(r)
            key = tuple(c[n] for n in ("tp", "cp", "dp", "pp") if n not in vary)
            seen.setdefault(key, []).append(r)
        return sorted(seen.values(), key=lambda g: g[0])


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    tp_size: int
    dp_size: int
    tp_group: Optional[object]  # None when world is one process
    dp_group: Optional[object]
    # keyed by EP size: this rank's expert-parallel group and expert-data-parallel group
    ep_groups: Dict[int, Optional[object]] = field(default_factory=dict)
    expert_dp_groups: Dict[int, Optional[object]] = field(default_factory=dict)
    cp_size: int = 1
    pp_size: int = 1
    etp_size: int = 1
    cp_group: Optional[object] = None  # None: CP = 1 (or one process)
    pp_group: Optional[object] = None
    dp_cp_group: Optional[object] = None  # DP x CP ranks (equals dp_group's ranks when CP = 1)
    tp_cp_group: Optional[object] = None  # TP x CP ranks: the chunks of the same sequences under SP and CP
    sequence_parallel: bool = False  # --sequence-parallel: norm/dropout regions sharded along the sequence over TP
    # the expert grid (module docstring): True when ETP > 1 or an EP size folds over TP/CP ranks
    expert_folded: bool = False
    etp_groups: Dict[int, Optional[object]] = field(default_factory=dict)  # keyed by EP size; None: ETP = 1
    expert_mp_groups: Dict[int, Optional[object]] = field(default_factory=dict)  # ETP x EP ranks, keyed by EP size
    embedding_group: Optional[object] = None  # PP > 1: the first and last stage of this rank's pipeline (the tied
    #                                           embedding / LM head copies' gradients are summed over it; Megatron's)

    @property
    def layout(self) -> RankLayout:
        return RankLayout(self.tp_size, self.cp_size, self.dp_size, self.pp_size)

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)["dp"] if self.world_size > 1 else 0

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def cp_rank(self) -> int:
        return self.layout.coords(self.rank)["cp"] if self.world_size > 1 else 0

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)["pp"] if self.world_size > 1 else 0

    def ep_group(self, ep_size: int):
        """This rank's expert-parallel group of `ep_size` ranks (None: one rank, no communication)."""
        return self._built(self.ep_groups, ep_size)

    def expert_dp_group(self, ep_size: int):
        """The ranks holding the same experts as this one under EP size `ep_size` (None: one rank)."""
        return self._built(self.expert_dp_groups, ep_size)

    def etp_group(self, ep_size: int):
        """This rank's expert-tensor-parallel group (the ranks splitting each expert's FFN; None: ETP = 1)."""
        return self.etp_groups.get(ep_size) if self.etp_size > 1 else None

    def expert_norm_group(self, ep_size: int):
        """The ranks that together hold every expert shard of this EP size once (ETP x EP; the EP group without
        folding; None: one rank): squared expert gradient norms are summed over it."""
        if self.expert_folded:
            return self.expert_mp_groups.get(ep_size)
        return None if self.dp_size == 1 or ep_size == 1 else self.ep_group(ep_size)

    @property
    def token_dedup_group(self):
        """The TP group when its ranks hold the same tokens (TP > 1 without sequence parallelism): each of its ranks
        dispatches its 1/TP slice of the tokens (moe/layer.py), on the expert grid or with experts replicated over
        TP (whose expert-DP groups then span the TP ranks: _expert_rank_lists); else None."""
        if self.tp_size > 1 and not self.sequence_parallel:
            return self.tp_group
        return None

    @staticmethod
    def _built(groups: Dict[int, Optional[object]], ep_size: int):
        if ep_size not in groups:
            raise ValueError(f"--moe-expert-parallel-size {ep_size}: no expert-parallel group of that size was built "
                             f"(built: {sorted(groups)}); include it in parallel_state.initialize(tp, ep_sizes)")
        return groups[ep_size]


def validate_sizes(world_size: int, tp_size: int, ep_sizes: Sequence[int], cp_size: int = 1, pp_size: int = 1,
                   etp_size: int = 1) -> int:
    """Checks the degrees multiply out (the one home of this check: `arguments.validate` calls it before anything
    is built, `initialize` again for callers that build groups directly); returns the data-parallel size.
    world = TP x CP x DP x PP; EP divides DP (experts replicated over TP/CP), or, on the expert grid (ETP > 1 or
    EP folded), EP x ETP divides TP x CP x DP."""
    factors = (f"--tensor-model-parallel-size ({tp_size}) x --context-parallel-size ({cp_size}) x "
               f"--pipeline-model-parallel-size ({pp_size})")
    for value, flag in ((tp_size, "--tensor-model-parallel-size"), (cp_size, "--context-parallel-size"),
                        (pp_size, "--pipeline-model-parallel-size"), (etp_size, "--expert-tensor-parallel-size")):
        if value < 1:
            raise ConfigError(f"{flag} ({value}) must be >= 1")
    model_parallel = tp_size * cp_size * pp_size
    if world_size % model_parallel != 0:
        raise ConfigError(f"world size ({world_size}) must be divisible by {factors} = {model_parallel} (world = "
                          f"TP x CP x data-parallel x PP); launch with torchrun --nproc_per_node=<a multiple of "
                          f"{model_parallel}>")
    dp_size = world_size // model_parallel
    if expert_folded(tp_size, cp_size, dp_size, ep_sizes, etp_size):
        stage = tp_size * cp_size * dp_size
        for ep in ep_sizes:
            if stage % (ep * etp_size) != 0:
                raise ConfigError(
                    f"--moe-expert-parallel-size ({ep}) x --expert-tensor-parallel-size ({etp_size}) = {ep * etp_size} "
                    f"must divide the ranks of a pipeline stage: world size ({world_size}) / "
                    f"--pipeline-model-parallel-size ({pp_size}) = --tensor-model-parallel-size ({tp_size}) x "
                    f"--context-parallel-size ({cp_size}) x data-parallel ({dp_size}) = {stage} (expert grid "
                    f"ETP x EP x expert-DP over TP x CP x DP); pick EP x ETP dividing {stage}")
    return dp_size


def expert_folded(tp_size: int, cp_size: int, dp_size: int, ep_sizes: Sequence[int], etp_size: int) -> bool:
    """The expert grid (module docstring) is used: ETP > 1, or some EP size does not divide DP (EP then folds over
    the TP/CP ranks). Otherwise experts stay replicated over TP and CP with EP inside the DP group."""
    return etp_size > 1 or any(dp_size % ep != 0 for ep in ep_sizes)


def world_size() -> int:
    """The number of processes of this run, known before the process group exists (torchrun's WORLD_SIZE)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str = "auto", timeout_minutes: Optional[float] = None) -> tuple:
    """Initialises torch.distributed from torchrun's env vars when present; returns (rank, world_size, device).
    timeout_minutes: --distributed-timeout-minutes, the timeout of the default group (None: torch's default)."""
    world = world_size()  # already set up by the caller (tests, a user's own launcher), or torchrun's env
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank % max(torch.cuda.device_count(), 1))))
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=_timeout(timeout_minutes))
    return rank, world, device


def _timeout(minutes: Optional[float]):
    """--distributed-timeout-minutes as a timedelta (None: torch's default; subgroups do not inherit the default
    group's timeout, so every new_group gets it too, as in Megatron-LM)."""
    return None if minutes is None else datetime.timedelta(minutes=minutes)


def _new_groups(rank_lists: List[List[int]], rank: int, timeout=None):
    """Creates every group of `rank_lists` (collective: all ranks create all, in the same order); returns the one
    holding `rank` (None when none does)."""
    mine = None
    for ranks in rank_lists:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


def _expert_rank_lists(layout: RankLayout, ep_size: int, span_tp: bool = False):
    """(EP groups, expert-DP groups): inside every DP group, consecutive chunks of ep_size ranks, and the ranks with
    the same slot across chunks. Example world 8, TP 1, EP 4: EP {0..3},{4..7}; expert-DP {0,4},{1,5},{2,6},{3,7}.
    span_tp (TP ranks dispatch disjoint token slices: ParallelGroups.token_dedup_group): an expert-DP group holds
    that slot's ranks of every TP rank too, so the TP slices' partial expert gradients are summed with the replicas'.
    Example world 4, TP 2, DP 2, EP 1: expert-DP {0,1,2,3} (else {0,2},{1,3})."""
    ep, edp = [], []
    for dp_ranks in layout.groups(("dp",)):
        ep += [dp_ranks[c:c + ep_size] for c in range(0, len(dp_ranks), ep_size)]
        if not span_tp:
            edp += [dp_ranks[slot::ep_size] for slot in range(ep_size)]
    if span_tp:
        for ranks in layout.groups(("tp", "dp")):
            edp += [[r for r in ranks if layout.coords(r)["dp"] % ep_size == slot] for slot in range(ep_size)]
        edp.sort(key=lambda g: g[0])
    return ep, edp


@dataclass(frozen=True)
class ExpertLayout:
    """The expert grid (module docstring): each pipeline stage's S = TP x CP x DP ranks as ETP x EP x expert-DP,
    ETP fastest; global rank = stage rank + S x pp_rank."""
    etp: int
    ep: int
    edp: int
    pp: int

    def coords(self, rank: int) -> Dict[str, int]:
        """{'etp', 'ep', 'edp', 'pp'} coordinates of global `rank`."""
        out = {}
        for name in ("etp", "ep", "edp", "pp"):
            size = getattr(self, name)
            out[name], rank = rank % size, rank // size
        return out

    def groups(self, vary: Sequence[str]) -> List[List[int]]:
        """Every group whose members differ only in the `vary` coordinates, in order of their smallest rank."""
        seen: Dict[tuple, List[int]] = {}
        for r in range(self.etp * self.ep * self.edp * self.pp):
            c = self.coords(r)
            seen.setdefault(tuple(c[n] for n in ("etp", "ep", "edp", "pp") if n not in vary), []).append(r)
        return sorted(seen.values(), key=lambda g: g[0])


def expert_layout(layout: RankLayout, ep_size: int, etp_size: int) -> ExpertLayout:
    stage = layout.tp * layout.cp * layout.dp
    return ExpertLayout(etp_size, ep_size, stage // (ep_size * etp_size), layout.pp)


def initialize(tp_size: int = 1, ep_sizes: Sequence[int] = (1,), timeout_minutes: Optional[float] = None, *,
               cp_size: int = 1, pp_size: int = 1, etp_size: int = 1,
               sequence_parallel: bool = False) -> ParallelGroups:
    """Builds all groups for the current world (call once, after init_distributed); every group gets the timeout
    --distributed-timeout-minutes (None: torch's default). Sizes: TP, EP sizes (one per MoE layer size used), CP,
    PP, ETP (module docstring: rank order and the groups)."""
    if not dist.is_initialized():
        validate_sizes(1, tp_size, ep_sizes, cp_size, pp_size, etp_size)
        return ParallelGroups(1, 0, tp_size, 1, None, None, {e: None for e in ep_sizes}, {e: None for e in ep_sizes},
                              sequence_parallel=sequence_parallel, etp_size=etp_size)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    dp_size = validate_sizes(world_size, tp_size, ep_sizes, cp_size, pp_size, etp_size)
    layout = RankLayout(tp_size, cp_size, dp_size, pp_size)
    timeout = _timeout(timeout_minutes)
    # creation order: TP, DP, then the expert groups (the order before CP/PP existed), then CP, DP x CP, PP
    tp_group = _new_groups(layout.groups(("tp",)), rank, timeout)
    dp_group = _new_groups(layout.groups(("dp",)), rank, timeout)
    ep_groups, edp_groups, etp_groups, emp_groups = {}, {}, {}, {}
    folded = expert_folded(tp_size, cp_size, dp_size, ep_sizes, etp_size)
    for ep in sorted(set(ep_sizes)):
        if folded:  # the expert grid: EP, expert-DP, ETP, ETP x EP groups
            grid = expert_layout(layout, ep, etp_size)
            ep_lists, edp_lists = grid.groups(("ep",)), grid.groups(("edp",))
        else:
            ep_lists, edp_lists = _expert_rank_lists(layout, ep, span_tp=tp_size > 1 and not sequence_parallel)
        ep_groups[ep], edp_groups[ep] = _new_groups(ep_lists, rank, timeout), _new_groups(edp_lists, rank, timeout)
        if folded:
            etp_groups[ep] = _new_groups(grid.groups(("etp",)), rank, timeout) if etp_size > 1 else None
            emp_groups[ep] = _new_groups(grid.groups(("etp", "ep")), rank, timeout)
    cp_group = _new_groups(layout.groups(("cp",)), rank, timeout) if cp_size > 1 else None
    dp_cp_group = _new_groups(layout.groups(("cp", "dp")), rank, timeout) if cp_size > 1 else dp_group
    pp_lists = layout.groups(("pp",))
    pp_group = _new_groups(pp_lists, rank, timeout) if pp_size > 1 else None
    embedding_group = _new_groups([[g[0], g[-1]] for g in pp_lists], rank, timeout) if pp_size > 1 else None
    tp_cp_group = (_new_groups(layout.groups(("tp", "cp")), rank, timeout) if cp_size > 1 and tp_size > 1
                   else (cp_group if cp_size > 1 else tp_group))
    return ParallelGroups(world_size, rank, tp_size, dp_size, tp_group, dp_group, ep_groups, edp_groups,
                          cp_size=cp_size, pp_size=pp_size, etp_size=etp_size, cp_group=cp_group, pp_group=pp_group,
                          dp_cp_group=dp_cp_group, tp_cp_group=tp_cp_group, sequence_parallel=sequence_parallel,
                          expert_folded=folded, etp_groups=etp_groups, expert_mp_groups=emp_groups,
                          embedding_group=embedding_group)
