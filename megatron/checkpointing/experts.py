"""Expert files: one per (MoE layer, global expert id, ETP rank) holding that expert's weights and Adam state (its
ETP shard: layer_{L}_expert_{E}_mp_rank_{ETP rank}_...), so a checkpoint written at one EP and ETP size loads at any
other (each rank reads the files of the experts it holds, merging and cutting ETP shards when the sizes differ)."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from moe.experts import etp_merge, etp_shard, is_expert_param
from moe.layer import MoELayer

from megatron.checkpointing import integrity, optim_state
from megatron.checkpointing.copies import one_intra_op_thread
from megatron.checkpointing.layout import expert_path
from megatron.errors import CheckpointError


def moe_layers(model: torch.nn.Module):
    """(moe_layer_index, module_prefix, layer) for every MoE layer, in model order."""
    layers = [(mod.layer_index, name, mod) for name, mod in model.named_modules() if isinstance(mod, MoELayer)]
    for index, name, _ in layers:
        if index is None:
            raise CheckpointError(f"MoE layer {name} has no layer_index, so its experts cannot be named in a "
                                  f"checkpoint (they would be lost); set `{name}.layer_index` to its position among "
                                  f"the model's MoE layers (GPTModel sets it)")
    return layers


def expert_param_names(model: torch.nn.Module, prefix: str) -> List[str]:
    return [n for n, p in model.named_parameters() if n.startswith(prefix + ".") and is_expert_param(p)]


def is_expert_param_name(model: torch.nn.Module) -> Dict[str, bool]:
    return {n: is_expert_param(p) for n, p in model.named_parameters()}


def model_tp_rank(model) -> int:
    """The tensor-parallel rank the model was built for (0 without tensor parallelism)."""
    group = getattr(model, "tp_group", None)
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------------------------- save
def expert_payloads(model, opt_state: dict, groups, optimizer, take_slice: Callable[[torch.Tensor], torch.Tensor]
                    ) -> List[Tuple[str, dict]]:
    """(path relative to the iteration directory, payload) of every expert file this rank writes.

    Experts are replicated over tensor parallelism (not sharded), so TP rank 0 writes the one file per
    (MoE layer, global expert) that DESIGN §5 specifies, named ..._mp_rank_00_..., and every TP rank reads it; of the
    replicas over expert-data parallelism, expert-DP rank 0 writes. `take_slice(t[i])` gives one expert's tensor
    whose storage holds only its bytes (payload.exact_view; a plain view would make torch.save write the whole
    stacked tensor)."""
    out = []
    # experts replicated over TP and CP: TP rank 0 of CP rank 0 writes; on the folded grid (issue 27) the expert-DP
    # group alone says who holds a replica
    replica = model_tp_rank(model) != 0 or getattr(groups, "cp_rank", 0) != 0
    params = dict(model.named_parameters())
    for moe_idx, prefix, layer in moe_layers(model):
        if replica and not layer.expert_grid:
            continue
        edp_group = groups.expert_dp_group(layer.ep_size) if groups is not None else None
        if edp_group is not None and dist.get_rank(edp_group) != 0:
            continue
        names = expert_param_names(model, prefix)
        etp = _etp_info(model, prefix, names)
        e = layer.num_local_experts
        for i in range(e):
            gid = layer.ep_rank * e + i
            weights = {n[len(prefix) + 1:]: take_slice(params[n].detach()[i]) for n in names}
            optim = optim_state.offloaded_expert_state(optimizer, moe_idx, gid)  # state in an offload store
            for n in names:
                if n in opt_state:
                    # a 0-dim tensor (Adam's step count) is copied now: the next step increments it in place
                    # before an asynchronous save writes it
                    optim[n[len(prefix) + 1:]] = {k: (take_slice(v[i]) if v.dim() > 0 else v.detach().clone())
                                                  if torch.is_tensor(v) else v for k, v in opt_state[n].items()}
            out.append((expert_path("", moe_idx, gid, layer_etp_rank(layer)),
                        {"moe_layer": moe_idx, "expert_id": gid, "num_experts": e * layer.ep_size, "model": weights,
                         "optimizer": optim, "etp_size": layer.etp_size, "etp_rank": layer_etp_rank(layer),
                         "etp_dims": etp}))
    return out


def layer_etp_rank(layer) -> int:
    return getattr(layer.experts, "etp_rank", 0)


def _etp_info(model, prefix: str, names: List[str]) -> Dict[str, Tuple[int, bool]]:
    """{name in the layer: (split dim of ONE expert's tensor, gated halves)} of the ETP-sharded expert parameters."""
    params = dict(model.named_parameters())
    return {n[len(prefix) + 1:]: (params[n].etp_dim - 1, bool(params[n].etp_gated))
            for n in names if hasattr(params[n], "etp_dim")}


def reshard_etp(payloads: List[dict], dims: Dict[str, Tuple[int, bool]], etp_size: int, etp_rank: int) -> dict:
    """One expert's payload for ETP rank `etp_rank` of `etp_size`, from the files of every ETP rank it was saved at
    (in rank order): each sharded tensor (weights, Adam's exp_avg / exp_avg_sq) merged along its dim (etp_merge),
    then cut for this rank (etp_shard); Adam's step count and unsharded entries from the first file."""
    def one(key, pieces):
        if key not in dims or not torch.is_tensor(pieces[0]) or pieces[0].dim() == 0:
            return pieces[0]
        dim, gated = dims[key]
        return etp_shard(etp_merge(pieces, dim, gated), dim, etp_size, etp_rank, gated).clone()

    first = payloads[0]
    model = {k: one(k, [p["model"][k] for p in payloads]) for k in first["model"]}
    optim = {k: {s: one(k, [p["optimizer"][k][s] for p in payloads]) for s in st}
             for k, st in first.get("optimizer", {}).items()}
    return {**first, "model": model, "optimizer": optim, "etp_size": etp_size, "etp_rank": etp_rank}


# ----------------------------------------------------------------------------------------------- load
def read_expert_files(model, ckpt_dir: str, keep_optimizer: bool = True) -> Dict[Tuple[int, int], dict]:
    """This rank's expert files of `ckpt_dir` (verified), keyed by (MoE layer, global expert id); each read once.
    Without `keep_optimizer` each payload's Adam state is dropped as soon as its file is read (expert optimizer state
    offloaded to NVMe: it is re-read one file at a time into the store, never all in memory at once)."""
    out = {}
    for moe_idx, prefix, layer in moe_layers(model):
        e = layer.num_local_experts
        etp, etp_rank = layer.etp_size, layer_etp_rank(layer)
        dims = _etp_info(model, prefix, expert_param_names(model, prefix))
        for gid in range(layer.ep_rank * e, (layer.ep_rank + 1) * e):
            def read(r):
                payload = integrity.load_checkpoint_file(ckpt_dir, expert_path(ckpt_dir, moe_idx, gid, r), mmap=True)
                if not keep_optimizer and isinstance(payload, dict):
                    payload.pop("optimizer", None)
                return payload
            # this rank's shard when the checkpoint has one (saved at this ETP size, or a larger one), else shard 0;
            # the payload says the size it was saved at
            first = etp_rank if os.path.exists(expert_path(ckpt_dir, moe_idx, gid, etp_rank)) else 0
            payload = read(first)
            saved = payload.get("etp_size", 1) if isinstance(payload, dict) else 1
            if saved != etp:  # saved at another ETP size: every shard of it, merged and cut for this rank
                pieces = [payload if r == first else read(r) for r in range(saved)]
                payload = reshard_etp(pieces, dims or payload.get("etp_dims", {}), etp, etp_rank)
            out[(moe_idx, gid)] = payload
    return out


def read_whole_expert(ckpt_dir: str, moe_layer: int, expert_id: int, mmap: bool = False) -> dict:
    """One expert's verified payload as ETP = 1 holds it, for one-process readers (Hugging Face export, offload
    stores): its file, or every ETP rank's file merged (reshard_etp) when it was saved with ETP > 1."""
    payload = integrity.load_checkpoint_file(ckpt_dir, expert_path(ckpt_dir, moe_layer, expert_id), mmap=mmap)
    saved = payload.get("etp_size", 1) if isinstance(payload, dict) else 1
    if saved == 1:
        return payload
    pieces = [payload] + [integrity.load_checkpoint_file(ckpt_dir, expert_path(ckpt_dir, moe_layer, expert_id, r),
                                                         mmap=mmap) for r in range(1, saved)]
    return reshard_etp(pieces, payload.get("etp_dims", {}), 1, 0)


def load_experts(model, ckpt_dir: str, load_weights: bool, experts: Optional[dict] = None) -> Dict[str, dict]:
    """Reads this rank's expert files (unless given as `experts`); fills the local expert slices when `load_weights`.

    Without `load_weights`, returns the per-parameter Adam state stacked over the local experts (keyed by
    parameter name); with it, {} (the optimizer state is not needed then).
    """
    experts = read_expert_files(model, ckpt_dir) if experts is None else experts
    with one_intra_op_thread():
        return _install_experts(model, ckpt_dir, load_weights, experts)


def _install_experts(model, ckpt_dir: str, load_weights: bool, experts: dict) -> Dict[str, dict]:
    stacked_opt: Dict[str, dict] = {}
    params = dict(model.named_parameters())
    for moe_idx, prefix, layer in moe_layers(model):
        e = layer.num_local_experts
        names = expert_param_names(model, prefix)
        per_expert = [experts[(moe_idx, layer.ep_rank * e + i)] for i in range(e)]
        total = per_expert[0].get("num_experts")
        if total is not None and total != e * layer.ep_size:
            raise CheckpointError(f"--num-experts mismatch: checkpoint {ckpt_dir} MoE layer {moe_idx} has {total} "
                                  f"experts, the flags give {e * layer.ep_size}")
        with torch.no_grad():
            for n in names:
                short = n[len(prefix) + 1:]
                for i, ex in enumerate(per_expert if load_weights else ()):
                    if short not in ex["model"]:
                        raise CheckpointError(f"{ckpt_dir}: expert file for layer {moe_idx} lacks {short}")
                    src = ex["model"][short]
                    if tuple(src.shape) != tuple(params[n].shape[1:]):
                        raise CheckpointError(f"{ckpt_dir}: expert parameter {short} has shape {tuple(src.shape)}"
                                              f", the model expects {tuple(params[n].shape[1:])}")
                    params[n][i].copy_(src)
                if not load_weights and all(short in ex["optimizer"] for ex in per_expert):
                    first = per_expert[0]["optimizer"][short]
                    stacked_opt[n] = {k: (torch.stack([ex["optimizer"][short][k] for ex in per_expert])
                                          if torch.is_tensor(first[k]) and first[k].dim() > 0 else first[k])
                                      for k in first.keys()}
    return stacked_opt


def fill_offloaded_expert_state(model, optimizer, ckpt_dir: str, experts: Optional[dict] = None) -> None:
    """Writes each local expert's Adam state from its checkpoint file (or its verified payload in `experts`, keyed by
    (MoE layer, global expert id), when that still holds its Adam state) into the offload store; the files read here
    are read (and verified) one at a time, so one expert's state is in memory at a time."""
    for moe_idx, prefix, layer in moe_layers(model):
        e = layer.num_local_experts
        present = None
        for g in range(layer.ep_rank * e, (layer.ep_rank + 1) * e):
            path = expert_path(ckpt_dir, moe_idx, g)
            given = experts.get((moe_idx, g)) if experts is not None else None
            optim = (given if given is not None and "optimizer" in given
                     else integrity.load_checkpoint_file(ckpt_dir, path, mmap=True))["optimizer"]
            if present is not None and set(optim) != present:  # the in-memory load would stack unequal sets
                raise CheckpointError(f"{path}: holds Adam state for {sorted(optim)}, the other experts of MoE layer "
                                      f"{moe_idx} for {sorted(present)}; the checkpoint is inconsistent")
            present = set(optim)
            optim_state.load_offloaded_expert_state(optimizer, moe_idx, g, optim)
