"""CogView4: joint attention over cat([text, image]) with rotary on the image tokens only."""

import torch
from diffusers import CogView4Transformer2DModel
from diffusers.models.transformers.transformer_cogview4 import CogView4RotaryPosEmbed

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM = 16


def build() -> CogView4Transformer2DModel:
    return seeded_model(
        lambda: CogView4Transformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            text_embed_dim=TEXT_DIM,
            time_embed_dim=16,
            condition_dim=8,
            pos_embed_max_size=16,
            sample_size=8,
            rope_axes_dim=(8, 8),
        )
    )


def rotary(model: CogView4Transformer2DModel, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary table, made outside its forward (by a rope module of its own, as a caller would)."""
    config = model.config
    return CogView4RotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_axes_dim)(latents)


def inputs(height: int, width: int, text: int, rope: bool = False, masked: bool = False):
    """``masked``: a padded text mask, which the processor turns into the additive float product m_q * m_k."""

    def make(model: CogView4Transformer2DModel) -> dict:
        latents = randn(1, 4, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1)  # CFG: the same latents twice
        return dict(
            hidden_states=latents,
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=torch.tensor([500.0, 500.0]),
            original_size=torch.tensor([[16.0, 16.0]] * 2),
            target_size=torch.tensor([[16.0, 16.0]] * 2),
            crop_coords=torch.tensor([[0.0, 0.0]] * 2),
            image_rotary_emb=rotary(model, latents) if rope else None,  # precomputed by the caller, or by the model
            attention_mask=text_mask(text) if masked else None,
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("cogview4-16img-8txt", build, inputs(4, 4, 8)),
    ZooCase("cogview4-15img-7txt", build, inputs(3, 5, 7)),
    ZooCase("cogview4-15img-3txt-rope", build, inputs(5, 3, 3, rope=True)),
    ZooCase("cogview4-15img-7txt-mask", build, inputs(3, 5, 7, masked=True)),
]
