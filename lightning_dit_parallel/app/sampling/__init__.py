"""LightningModules that sample under ``Trainer.predict``: ``DiffusionSampler`` over a diffusers transformer, and
``PipelineSampler`` over a whole diffusers pipeline."""

from lightning_dit_parallel.app.sampling.conditioning import ClassConditioning, Conditioning, TextConditioning
from lightning_dit_parallel.app.sampling.decode import ToUnitRange
from lightning_dit_parallel.app.sampling.joint_conditioning import (
    CogVideoXConditioning,
    FluxConditioning,
    SD3Conditioning,
    WanConditioning,
)
from lightning_dit_parallel.app.sampling.module import DiffusionSampler
from lightning_dit_parallel.app.sampling.noise import sample_noise
from lightning_dit_parallel.app.sampling.pipeline_sampler import PipelineSampler, load_pipeline

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
