"""Sana (linear self-attention, cross-attention to a masked caption, 3x3 convolutional feed-forward over the grid)."""

import torch
from diffusers import SanaTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

CAPTION_DIM = 16


def build(**config) -> SanaTransformer2DModel:
    return seeded_model(
        lambda: SanaTransformer2DModel(
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
            patch_size=1,
            **config,
        )
    )


def inputs(height: int, width: int, text: int, guidance: bool = False):
    def make(model: SanaTransformer2DModel) -> dict:
        extra = dict(guidance=torch.tensor([4.0, 4.0])) if guidance else {}
        return dict(
            hidden_states=randn(1, 4, height, width, seed=1).repeat(2, 1, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, CAPTION_DIM, seed=2),  # conditional and unconditional caption
            encoder_attention_mask=text_mask(text),
            timestep=torch.tensor([500, 500]),
            return_dict=False,
            **extra,
        )

    return make


CASES = [
    ZooCase("sana-16img-8txt", build, inputs(4, 4, 8)),
    ZooCase("sana-15img-7txt", build, inputs(3, 5, 7)),
    # Sana 1.5 / Sprint style: timestep + guidance embedding, sin-cos positions in the patch embedding
    ZooCase(
        "sana-35img-3txt-guidance", lambda: build(guidance_embeds=True, interpolation_scale=1), inputs(7, 5, 3, True)
    ),
]
