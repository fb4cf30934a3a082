"""AuraFlow: MMDiT and single blocks; 8 register tokens prepended to the text inside the forward."""

import torch
from diffusers import AuraFlowTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM = 16


def build() -> AuraFlowTransformer2DModel:
    return seeded_model(
        lambda: AuraFlowTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_mmdit_layers=1,
            num_single_dit_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=64,
            pos_embed_max_size=64,
        )
    )


def inputs(height: int, width: int, text: int):
    def make(model: AuraFlowTransformer2DModel) -> dict:
        return dict(
            hidden_states=randn(1, 4, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1),  # CFG: the same latents
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=torch.tensor([0.5, 0.5]),
            return_dict=False,
        )

    return make


CASES = [
    # context = 8 registers + 8 text tokens = 16
    ZooCase("auraflow-16img-8txt", build, inputs(4, 4, 8)),
    # context = 8 registers + 7 text tokens = 15
    ZooCase("auraflow-15img-7txt", build, inputs(3, 5, 7)),
]
