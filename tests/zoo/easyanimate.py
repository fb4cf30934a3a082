"""EasyAnimate: MMDiT blocks then blocks with one shared projection, joint text-video attention, 3-D rotary,
text from two encoders concatenated inside the forward."""

import torch
from diffusers import EasyAnimateTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM, T5_DIM, CHANNELS, PATCH = 16, 12, 4, 2


def build() -> EasyAnimateTransformer3DModel:
    # layer 0 is an MMDiT block (own text projections and feed-forward), layer 1 shares them with the video tokens
    return seeded_model(
        lambda: EasyAnimateTransformer3DModel(
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            patch_size=PATCH,
            num_layers=2,
            mmdit_layers=1,
            time_embed_dim=32,
            text_embed_dim=TEXT_DIM,
            text_embed_dim_t5=T5_DIM,
        )
    )


def inputs(frames: int, height: int, width: int, text: int, text_t5: int):
    """``height`` x ``width`` patches per frame; ``text`` + ``text_t5`` text tokens (the second encoder's optional)."""

    def make(model: EasyAnimateTransformer3DModel) -> dict:
        latents = randn(1, CHANNELS, frames, height * PATCH, width * PATCH, seed=1)
        return dict(
            hidden_states=latents.repeat(2, 1, 1, 1, 1),  # CFG: the same latents twice
            timestep=torch.tensor([500, 500]),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            encoder_hidden_states_t5=randn(2, text_t5, T5_DIM, seed=3) if text_t5 else None,
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("easyanimate-16vid-8txt", build, inputs(2, 2, 4, 6, 2)),  # 2 x 2 x 4 video, 6 + 2 text tokens
    ZooCase("easyanimate-27vid-7txt", build, inputs(3, 3, 3, 7, 0)),  # 3 x 3 x 3 video, 7 text tokens
]
