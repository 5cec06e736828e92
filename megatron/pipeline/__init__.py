"""Pipeline parallelism (--pipeline-model-parallel-size) on torch.distributed.pipelining: the layer split
(layout), the stage chunks (stage) and the schedules (schedule)."""
from megatron.pipeline.layout import build_stage_model, rank_chunks, stage_layers
from megatron.pipeline.schedule import SCHEDULES, Pipeline
from megatron.pipeline.stage import AuxLossToOutput, GPTChunk

__all__ = ["AuxLossToOutput", "GPTChunk", "Pipeline", "SCHEDULES", "build_stage_model", "rank_chunks", "stage_layers"]
