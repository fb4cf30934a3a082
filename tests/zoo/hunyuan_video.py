"""HunyuanVideo: a token refiner over the text, dual-stream then single-stream blocks with joint attention over
[video, text] under a text key mask built inside the forward, 3-D rotary; the I2V variant (``token_replace``)
modulates the first frame's tokens on their own."""

import torch
from diffusers import HunyuanVideoTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, POOLED_DIM, CHANNELS, PATCH = 16, 8, 4, 2


def build(image_condition_type: str | None = None):
    # head dim 16 = rotary axes (4, 6, 6); one block of each kind, one refiner block
    def factory() -> HunyuanVideoTransformer3DModel:
        return seeded_model(
            lambda: HunyuanVideoTransformer3DModel(
                in_channels=CHANNELS,
                out_channels=CHANNELS,
                num_attention_heads=4,
                attention_head_dim=16,
                num_layers=1,
                num_single_layers=1,
                num_refiner_layers=1,
                patch_size=PATCH,
                text_embed_dim=TEXT_DIM,
                pooled_projection_dim=POOLED_DIM,
                rope_axes_dim=(4, 6, 6),
                image_condition_type=image_condition_type,
            )
        )

    return factory


def inputs(frames: int, height: int, width: int, text: int):
    """``frames`` x ``height`` x ``width`` patches; ``text`` text tokens, the second sample's last 3 padded."""

    def make(model: HunyuanVideoTransformer3DModel) -> dict:
        latents = randn(1, CHANNELS, frames, height * PATCH, width * PATCH, seed=1)
        return dict(
            hidden_states=latents.repeat(2, 1, 1, 1, 1),  # CFG: the same latents twice
            timestep=torch.tensor([500, 500]),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            encoder_attention_mask=text_mask(text),
            pooled_projections=randn(2, POOLED_DIM, seed=3),
            guidance=torch.tensor([6000.0, 6000.0]),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("hunyuan_video-16vid-8txt", build(), inputs(2, 2, 4, 8)),
    ZooCase("hunyuan_video-27vid-7txt", build(), inputs(3, 3, 3, 7)),
    # 9 first-frame tokens of 27: on 4 ranks (7 tokens each) they lie on ranks 0 and 1
    ZooCase("hunyuan_video-i2v-27vid-5txt", build("token_replace"), inputs(3, 3, 3, 5)),
]
