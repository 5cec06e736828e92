"""Which global layers each pipeline stage (and virtual stage) holds: Megatron-LM's split, with its uneven
first/last stages and interleaved virtual stages, checked in one line naming every flag involved."""
from __future__ import annotations

from typing import List, Optional

from megatron.errors import ConfigError


def stage_layers(num_layers: int, pp_size: int, layers_per_virtual_stage: Optional[int] = None,
                 first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None) -> List[List[range]]:
    """[pp_rank][virtual_rank] -> the global layer indices of that model chunk (contiguous, in order).

    Global stage s = virtual_rank * pp_size + pp_rank runs after stage s - 1 (Megatron-LM's interleaving: with
    --num-layers-per-virtual-pipeline-stage n, stage s holds layers [s*n, (s+1)*n)). Without interleaving, the first
    and last stage hold --decoder-first/last-pipeline-num-layers when given and the other stages split the rest
    evenly (Megatron-LM's uneven pipeline). Raises ConfigError for a split that does not exist.
    """
    flags = (f"--num-layers ({num_layers}), --pipeline-model-parallel-size ({pp_size})"
             + (f", --num-layers-per-virtual-pipeline-stage ({layers_per_virtual_stage})"
                if layers_per_virtual_stage is not None else "")
             + (f", --decoder-first-pipeline-num-layers ({first_stage_layers})" if first_stage_layers is not None else "")
             + (f", --decoder-last-pipeline-num-layers ({last_stage_layers})" if last_stage_layers is not None else ""))
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if layers_per_virtual_stage is not None:
        if uneven:
            raise ConfigError(f"{flags}: uneven first/last stages do not combine with virtual stages here; drop "
                              f"--decoder-first/last-pipeline-num-layers or --num-layers-per-virtual-pipeline-stage")
        if pp_size < 2 or layers_per_virtual_stage < 1 or num_layers % (pp_size * layers_per_virtual_stage) != 0:
            raise ConfigError(f"{flags}: interleaving needs pipeline size > 1 and the layers divisible by pipeline "
                              f"size x layers per virtual stage ({pp_size} x {layers_per_virtual_stage}); pick "
                              f"values that divide --num-layers")
        n, vp = layers_per_virtual_stage, num_layers // (pp_size * layers_per_virtual_stage)
        return [[range((v * pp_size + r) * n, (v * pp_size + r + 1) * n) for v in range(vp)] for r in range(pp_size)]
    sizes = _uneven_sizes(num_layers, pp_size, first_stage_layers, last_stage_layers, flags)
    out, start = [], 0
    for n in sizes:
        out.append([range(start, start + n)])
        start += n
    return out


def _uneven_sizes(num_layers, pp_size, first, last, flags) -> List[int]:
    fixed = {0: first} if first is not None else {}
    if last is not None:
        fixed[pp_size - 1] = last
    if pp_size == 1 and fixed:
        raise ConfigError(f"{flags}: first/last stage layer counts need --pipeline-model-parallel-size > 1")
    if any(v < 1 for v in fixed.values()):
        raise ConfigError(f"{flags}: every stage needs at least one layer")
    rest, middle = num_layers - sum(fixed.values()), pp_size - len(fixed)
    if rest < middle or (middle == 0 and rest != 0) or (middle and rest % middle != 0):
        what = "the layers" if not fixed else "the layers left after the first/last stages"
        raise ConfigError(f"{flags}: {what} ({rest}) must split evenly, at least one each, over the other "
                          f"{middle} stage(s); change the counts so they do")
    return [fixed.get(r, rest // middle if middle else 0) for r in range(pp_size)]


def rank_chunks(cfg, pp_rank: int) -> List[range]:
    """This pipeline rank's chunks (global layer ranges, in virtual-stage order) for a TrainConfig."""
    par = cfg.parallel
    return stage_layers(cfg.model.num_layers, par.pipeline_model_parallel_size, par.layers_per_virtual_stage,
                        par.first_stage_layers, par.last_stage_layers)[pp_rank]


def build_stage_model(cfg, groups, device):
    """The GPTModel part of pipeline rank groups.pp_rank: its chunks' layers, the embedding on the first stage,
    final norm + head on the last (megatron/model/gpt_model.py keeps the whole model's initialisation)."""
    from megatron.model import GPTModel

    chunks = rank_chunks(cfg, groups.pp_rank)
    n_stages = groups.pp_size * len(chunks)
    stage_ids = [v * groups.pp_size + groups.pp_rank for v in range(len(chunks))]
    return GPTModel(cfg.model, cfg.moe, groups, layer_ids=[i for c in chunks for i in c],
                    pre_process=0 in stage_ids, post_process=n_stages - 1 in stage_ids).to(device)
