"""Flux 2: double-stream blocks and parallel single-stream blocks (fused qkv+mlp projection), 4-axis rotary."""

import torch
from diffusers import Flux2Transformer2DModel

from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM = 16


def build() -> Flux2Transformer2DModel:
    return seeded_model(
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            timestep_guidance_channels=16,
            mlp_ratio=2.0,
            axes_dims_rope=(4, 4, 4, 4),
        )
    )


def inputs(height: int, width: int, text: int, batched_ids: bool = False):
    def make(model: Flux2Transformer2DModel) -> dict:
        img_ids = torch.zeros(height, width, 4)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        img_ids = img_ids.reshape(-1, 4)
        txt_ids = torch.zeros(text, 4)
        txt_ids[:, 3] = torch.arange(text)
        if batched_ids:  # the pipeline passes (B, S, 4) ids
            img_ids, txt_ids = img_ids.expand(2, -1, -1), txt_ids.expand(2, -1, -1)
        return dict(
            hidden_states=randn(1, height * width, 16, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.tensor([3.5, 3.5]),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("flux2-16img-8txt", build, inputs(4, 4, 8)),
    ZooCase("flux2-15img-3txt", build, inputs(3, 5, 3, batched_ids=True)),
]
