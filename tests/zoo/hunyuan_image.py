"""HunyuanImage 2.1: double- and single-stream blocks over image then text tokens with a text mask; the text token
refiner runs on the whole text; a second (ByT5) text stream is merged into the text inside the forward."""

import torch
from diffusers import HunyuanImageTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, BYT5_DIM = 16, 8


def build() -> HunyuanImageTransformer2DModel:
    return seeded_model(
        lambda: HunyuanImageTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=4,
            attention_head_dim=16,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=(1, 1),
            text_embed_dim=TEXT_DIM,
            text_embed_2_dim=BYT5_DIM,
            rope_axes_dim=(8, 8),
        )
    )


def inputs(height: int, width: int, text: int, byt5: int = 0):
    def make(model: HunyuanImageTransformer2DModel) -> dict:
        return dict(
            hidden_states=randn(1, 4, height, width, seed=1).repeat(2, 1, 1, 1),  # CFG: the same latents twice
            timestep=torch.tensor([500.0, 500.0]),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            encoder_attention_mask=text_mask(text),
            encoder_hidden_states_2=randn(2, byt5, BYT5_DIM, seed=3) if byt5 else None,
            encoder_attention_mask_2=text_mask(byt5, (byt5 - 1, 1)) if byt5 else None,
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("hunyuan_image-16img-8txt", build, inputs(4, 4, 8)),
    ZooCase("hunyuan_image-15img-7txt", build, inputs(3, 5, 7)),
    # ByT5 tokens: the forward reorders the text of each sample to [valid ByT5, valid text, padding]
    ZooCase("hunyuan_image-15img-7txt-3byt5", build, inputs(3, 5, 7, byt5=3)),
]
