"""Cosmos: video self-attention with 3-D rotary and a learnable position embedding, a condition-mask channel,
cross-attention to text with a padding mask; per-frame timesteps (Predict2 video-to-world) and image context
(Cosmos 2.5) in the second case. The padding-mask channel needs torchvision (not a test dependency): it is a
channel of the latents like the condition mask, concatenated before the patch embedding."""

import torch
from diffusers import CosmosTransformer3DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, CHANNELS, IMAGE_DIM = 16, 4, 8


def build(image_context: bool = False, extra_pos_embed_type: str | None = "learnable"):
    """``extra_pos_embed_type=None``: Cosmos-Predict2 and 2.5, no learnable position embedding (a module the plan lists
    as optional)."""

    def factory() -> CosmosTransformer3DModel:
        return CosmosTransformer3DModel(
            in_channels=CHANNELS + 1,
            out_channels=CHANNELS,
            num_attention_heads=4,
            attention_head_dim=12,
            num_layers=2,
            text_embed_dim=TEXT_DIM,
            adaln_lora_dim=8,
            max_size=(8, 16, 16),
            patch_size=(1, 2, 2),
            concat_padding_mask=False,
            extra_pos_embed_type=extra_pos_embed_type,
            img_context_dim_in=IMAGE_DIM if image_context else None,
            img_context_num_tokens=3,
            img_context_dim_out=48,
        )

    return lambda: seeded_model(factory)


def inputs(frames: int, height: int, width: int, text: int, per_frame_timestep: bool, image_context: bool):
    """Latents (B, C, frames, height, width): frames * (height/2) * (width/2) video tokens."""

    def make(model: CosmosTransformer3DModel) -> dict:
        condition_mask = torch.zeros(2, 1, frames, height, width)
        condition_mask[:, :, 0] = 1  # video-to-world: the first frame is given
        timestep = torch.tensor([0.5, 0.5])
        if per_frame_timestep:  # (B, 1, F, 1, 1): the conditioning frame is clean
            timestep = (timestep[:, None] * (torch.arange(frames) > 0).float()).view(2, 1, frames, 1, 1)
        text_embeds = randn(2, text, TEXT_DIM, seed=2)  # conditional and unconditional text
        return dict(
            hidden_states=randn(1, CHANNELS, frames, height, width, seed=1).repeat(2, 1, 1, 1, 1),  # CFG: twice
            timestep=timestep,
            encoder_hidden_states=(text_embeds, randn(2, 3, IMAGE_DIM, seed=3)) if image_context else text_embeds,
            # the image-context processor takes no mask
            attention_mask=None if image_context else text_mask(text).bool(),
            fps=24,
            condition_mask=condition_mask,
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("cosmos-16vid-8txt", build(), inputs(2, 4, 8, 8, per_frame_timestep=False, image_context=False)),
    ZooCase(
        "cosmos-27vid-7txt-perframe-imgctx",
        build(image_context=True),
        inputs(3, 6, 6, 7, per_frame_timestep=True, image_context=True),
    ),
    ZooCase(
        "cosmos-15vid-7txt-noextrapos",
        build(extra_pos_embed_type=None),
        inputs(1, 6, 10, 7, per_frame_timestep=False, image_context=False),
    ),
]
