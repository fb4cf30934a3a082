"""A reference LightningModule that samples from a diffusers transformer under ``Trainer.predict``."""

from lightning_dit_parallel.sampling.conditioning import ClassConditioning, Conditioning, TextConditioning
from lightning_dit_parallel.sampling.module import DiffusionSampler
from lightning_dit_parallel.sampling.noise import sample_noise

__all__ = ["ClassConditioning", "Conditioning", "DiffusionSampler", "TextConditioning", "sample_noise"]
