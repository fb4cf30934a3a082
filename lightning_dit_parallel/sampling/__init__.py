"""LightningModules that sample under ``Trainer.predict``: ``DiffusionSampler`` over a diffusers transformer, and
``PipelineSampler`` over a whole diffusers pipeline."""

from lightning_dit_parallel.sampling.conditioning import ClassConditioning, Conditioning, TextConditioning
from lightning_dit_parallel.sampling.decode import ToUnitRange
from lightning_dit_parallel.sampling.joint_conditioning import (
    CogVideoXConditioning,
    FluxConditioning,
    SD3Conditioning,
    WanConditioning,
)
from lightning_dit_parallel.sampling.module import DiffusionSampler
from lightning_dit_parallel.sampling.noise import sample_noise
from lightning_dit_parallel.sampling.pipeline_sampler import PipelineSampler, load_pipeline

__all__ = [
    "ClassConditioning",
    "CogVideoXConditioning",
    "Conditioning",
    "DiffusionSampler",
    "FluxConditioning",
    "PipelineSampler",
    "SD3Conditioning",
    "TextConditioning",
    "ToUnitRange",
    "WanConditioning",
    "load_pipeline",
    "sample_noise",
]
