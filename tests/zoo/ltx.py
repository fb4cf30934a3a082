"""LTX-Video: video self-attention with 3-D rotary, cross-attention to text with a padding mask, per-token timesteps."""

import torch
from diffusers import LTXVideoTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, CHANNELS = 16, 8


def build() -> LTXVideoTransformer3DModel:
    return seeded_model(
        lambda: LTXVideoTransformer3DModel(
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            num_layers=2,
            caption_channels=TEXT_DIM,
        )
    )


def inputs(frames: int, height: int, width: int, text: int, per_token_timestep: bool):
    tokens = frames * height * width

    def make(model: LTXVideoTransformer3DModel) -> dict:
        timestep = torch.tensor([500.0, 500.0])
        if per_token_timestep:  # image-to-video: the first frame's tokens are the conditioning image (t = 0)
            timestep = timestep[:, None] * (torch.arange(tokens) >= height * width).float()[None, :]
        return dict(
            hidden_states=randn(1, tokens, CHANNELS, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=timestep,
            encoder_attention_mask=text_mask(text),
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(1 / 25, 32, 32),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("ltx-16vid-8txt", build, inputs(2, 2, 4, 8, per_token_timestep=False)),
    ZooCase("ltx-27vid-7txt-pertoken", build, inputs(3, 3, 3, 7, per_token_timestep=True)),
]
