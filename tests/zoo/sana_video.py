"""Sana-Video (linear self-attention with 3-D rotary keys, cross-attention to a masked caption, spatial 3x3 and
temporal 3x1 convolutional feed-forward)."""

import torch
from diffusers import SanaVideoTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

CAPTION_DIM = 16


def build() -> SanaVideoTransformer3DModel:
    return seeded_model(
        lambda: SanaVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=4,
            attention_head_dim=12,
            num_layers=2,
            num_cross_attention_heads=4,
            cross_attention_head_dim=12,
            cross_attention_dim=48,
            caption_channels=CAPTION_DIM,
            sample_size=8,
            patch_size=(1, 2, 2),
            rope_max_seq_len=32,
        )
    )


def inputs(frames: int, height: int, width: int, text: int):
    """Post-patch grid ``frames x height x width`` (latents are twice as high and wide)."""

    def make(model: SanaVideoTransformer3DModel) -> dict:
        return dict(
            hidden_states=randn(1, 4, frames, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1, 1),  # CFG
            encoder_hidden_states=randn(2, text, CAPTION_DIM, seed=2),
            encoder_attention_mask=text_mask(text),
            timestep=torch.tensor([500, 500]),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("sana_video-32vid-8txt", build, inputs(2, 4, 4, 8)),
    ZooCase("sana_video-27vid-7txt", build, inputs(3, 3, 3, 7)),
    ZooCase("sana_video-36vid-3txt", build, inputs(3, 4, 3, 3)),  # on 4 ranks a rank holds 9 tokens of 12-token frames
]
