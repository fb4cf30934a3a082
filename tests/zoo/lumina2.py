"""Lumina Image 2.0: refiner blocks over the image and the text, then one joint [valid text, image] sequence per
sample with a padding mask when the samples' text lengths differ; grouped-query attention."""

import torch
from diffusers import Lumina2Transformer2DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM = 16


def build() -> Lumina2Transformer2DModel:
    return seeded_model(
        lambda: Lumina2Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            hidden_size=64,
            num_layers=2,
            num_refiner_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            multiple_of=16,
            axes_dim_rope=(4, 6, 6),
            axes_lens=(64, 32, 32),
            cap_feat_dim=TEXT_DIM,
        )
    )


def inputs(height: int, width: int, text: int, masked: bool = True):
    """``height`` x ``width`` image tokens (patch size 2)."""

    def make(model: Lumina2Transformer2DModel) -> dict:
        return dict(
            hidden_states=randn(1, 4, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1),  # CFG: the same latents
            timestep=torch.tensor([0.5, 0.5]),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            encoder_attention_mask=text_mask(text) if masked else torch.ones(2, text, dtype=torch.long),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("lumina2-16img-8txt", build, inputs(4, 4, 8)),
    ZooCase("lumina2-15img-7txt", build, inputs(3, 5, 7)),
    ZooCase("lumina2-15img-3txt-nomask", build, inputs(3, 5, 3, masked=False)),
]
