"""Mochi: joint attention over the cut video tokens and the text tokens each sample's mask keeps (the processor
selects them one sample at a time); 3-D rotary on the video tokens."""

import torch
from diffusers import MochiTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, CHANNELS = 16, 4


def build() -> MochiTransformer3DModel:
    return seeded_model(
        lambda: MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=4,
            attention_head_dim=8,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=CHANNELS,
            text_embed_dim=TEXT_DIM,
            time_embed_dim=16,
            max_sequence_length=16,
        )
    )


def inputs(frames: int, height: int, width: int, text: int):
    """Latents (B, C, frames, height, width): frames * (height/2) * (width/2) video tokens."""

    def make(model: MochiTransformer3DModel) -> dict:
        return dict(
            hidden_states=randn(1, CHANNELS, frames, height, width, seed=1).repeat(2, 1, 1, 1, 1),  # CFG: twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=torch.tensor([500, 500]),
            encoder_attention_mask=text_mask(text),  # the second sample keeps text - 3 tokens
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("mochi-16vid-8txt", build, inputs(2, 4, 8, 8)),
    ZooCase("mochi-27vid-7txt", build, inputs(3, 6, 6, 7)),
]
