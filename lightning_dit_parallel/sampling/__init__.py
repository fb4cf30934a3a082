"""A reference LightningModule that samples from a diffusers transformer under ``Trainer.predict``."""

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

__all__ = [
    "ClassConditioning",
    "CogVideoXConditioning",
    "Conditioning",
    "DiffusionSampler",
    "FluxConditioning",
    "SD3Conditioning",
    "TextConditioning",
    "ToUnitRange",
    "WanConditioning",
    "sample_noise",
]
