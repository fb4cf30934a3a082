"""Latte: spatial blocks (attention within a frame) and temporal blocks (attention across frames), cut along the
spatial positions. No text mask: LattePipeline passes none, and diffusers' forward does not repeat one per frame
(it fails on a (B, T) ``encoder_attention_mask``)."""

import torch
from diffusers import LatteTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM, CHANNELS = 16, 4


def build(frames: int):
    def make() -> LatteTransformer3DModel:
        return seeded_model(
            lambda: LatteTransformer3DModel(
                num_attention_heads=4,
                attention_head_dim=8,
                in_channels=CHANNELS,
                out_channels=2 * CHANNELS,
                num_layers=2,
                cross_attention_dim=32,
                attention_bias=True,
                sample_size=8,
                patch_size=2,
                activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=1e-6,
                caption_channels=TEXT_DIM,
                video_length=frames,
            )
        )

    return make


def inputs(frames: int, height: int, width: int, text: int, timesteps: tuple[int, int] = (500, 500)):
    """Latents of ``frames`` frames of ``height x width`` patches (patch size 2). Different ``timesteps`` per sample
    check that the temporal blocks' per-position timestep rows are cut sample by sample."""

    def make(model: LatteTransformer3DModel) -> dict:
        latents = randn(1, CHANNELS, frames, 2 * height, 2 * width, seed=1)
        return dict(
            hidden_states=latents.repeat(2, 1, 1, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=torch.tensor(timesteps),
            return_dict=False,
        )

    return make


CASES = [
    # 3 frames x 16 positions = 48 video tokens, positions (the cut) divisible by 4.
    ZooCase("latte-48vid-8txt", build(3), inputs(3, 4, 4, 8)),
    # 3 frames x 15 positions = 45 video tokens: neither divides 2 or 4.
    ZooCase("latte-45vid-3txt", build(3), inputs(3, 3, 5, 3)),
    ZooCase("latte-45vid-7txt-2steps", build(3), inputs(3, 3, 5, 7, timesteps=(500, 250))),
]
