"""Pipeline parallelism: stage sharding of the transformer blocks, exact micro-batch pipelining and PipeFusion."""

from lightning_dit_parallel.parallel.pipeline.options import PipelineMode, PipelineOptions
from lightning_dit_parallel.parallel.pipeline.parallelize import PipelineParallel, apply_pipeline
from lightning_dit_parallel.parallel.pipeline.stages import StageAssignment, assign_stages, stage_sizes

__all__ = [
    "PipelineMode",
    "PipelineOptions",
    "PipelineParallel",
    "StageAssignment",
    "apply_pipeline",
    "assign_stages",
    "stage_sizes",
]
