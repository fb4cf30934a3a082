"""Flux (shipped plan, also covered by test_families): the template for a zoo family file."""

import torch
from diffusers import FluxTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM, POOLED_DIM = 16, 8


def build() -> FluxTransformer2DModel:
    return seeded_model(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM,
            axes_dims_rope=(4, 6, 6),
        )
    )


def inputs(height: int, width: int, text: int):
    def make(model: FluxTransformer2DModel) -> dict:
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        return dict(
            hidden_states=randn(1, height * width, 16, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            pooled_projections=randn(2, POOLED_DIM, seed=3),
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=img_ids.reshape(-1, 3),
            txt_ids=torch.zeros(text, 3),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("flux-16img-8txt", build, inputs(4, 4, 8)),
    ZooCase("flux-15img-3txt", build, inputs(3, 5, 3)),
]
