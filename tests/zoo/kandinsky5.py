"""Kandinsky 5: text blocks over the text alone, then video blocks with self-attention (3-D rotary) and
cross-attention to the text; the video tokens are flattened and unflattened inside the forward."""

import torch
from diffusers import Kandinsky5Transformer3DModel

from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM, POOLED_DIM, CHANNELS = 16, 8, 4
PATCH = (1, 2, 2)


def build() -> Kandinsky5Transformer3DModel:
    # head dim = sum(axes_dims) = 16, model_dim 64: 4 heads
    return seeded_model(
        lambda: Kandinsky5Transformer3DModel(
            in_visual_dim=CHANNELS,
            in_text_dim=TEXT_DIM,
            in_text_dim2=POOLED_DIM,
            time_dim=32,
            out_visual_dim=CHANNELS,
            patch_size=PATCH,
            model_dim=64,
            ff_dim=128,
            num_text_blocks=1,
            num_visual_blocks=2,
            axes_dims=(4, 6, 6),
        )
    )


def inputs(frames: int, height: int, width: int, text: int):
    """``frames`` x ``height`` x ``width`` patches, ``text`` text tokens."""

    def make(model: Kandinsky5Transformer3DModel) -> dict:
        latents = randn(1, frames * PATCH[0], height * PATCH[1], width * PATCH[2], CHANNELS, seed=1)  # channels last
        return dict(
            hidden_states=latents.repeat(2, 1, 1, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=torch.tensor([500.0, 500.0]),
            pooled_projections=randn(2, POOLED_DIM, seed=3),
            visual_rope_pos=(torch.arange(frames), torch.arange(height), torch.arange(width)),
            text_rope_pos=torch.arange(text),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("kandinsky5-16vid-8txt", build, inputs(2, 2, 4, 8)),
    ZooCase("kandinsky5-27vid-7txt", build, inputs(3, 3, 3, 7)),
]
