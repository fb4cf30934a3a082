"""Allegro: video self-attention with 3-D rotary given as per-token positions, cross-attention to masked text."""

import torch
from diffusers import AllegroTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, CHANNELS, HEAD_DIM = 16, 4, 12  # head dim 12 = t 4 + h 4 + w 4


def build() -> AllegroTransformer3DModel:
    return seeded_model(
        lambda: AllegroTransformer3DModel(
            patch_size=2,
            patch_size_t=1,
            num_attention_heads=4,
            attention_head_dim=HEAD_DIM,
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            num_layers=2,
            cross_attention_dim=4 * HEAD_DIM,
            sample_height=8,
            sample_width=8,
            sample_frames=4,
            caption_channels=TEXT_DIM,
        )
    )


def rotary(model: AllegroTransformer3DModel, frames: int, height: int, width: int):
    """What AllegroPipeline._prepare_rotary_positional_embeddings returns for a grid of patches."""
    config = model.config
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=config.attention_head_dim,
        crops_coords=((0, 0), (height, width)),
        grid_size=(height, width),
        temporal_size=frames,
        interpolation_scale=(config.interpolation_scale_t, config.interpolation_scale_h, config.interpolation_scale_w),
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())  # (F*H*W, 3)
    grid_t, grid_h, grid_w = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()  # 3 x (1, F*H*W)
    return (freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w)


def inputs(frames: int, height: int, width: int, text: int, video_mask: bool = False):
    """Latents of ``frames`` frames of ``height x width`` patches (patch size 2); with ``video_mask``, a
    self-attention mask (B, F, H, W) over the latents that hides the second sample's last frame."""

    def make(model: AllegroTransformer3DModel) -> dict:
        latents = randn(1, CHANNELS, frames, 2 * height, 2 * width, seed=1)
        mask = None
        if video_mask:
            mask = torch.ones(2, frames, 2 * height, 2 * width)
            mask[1, -1] = 0
        return dict(
            hidden_states=latents.repeat(2, 1, 1, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            attention_mask=mask,
            encoder_attention_mask=text_mask(text),
            timestep=torch.tensor([500, 500]),
            image_rotary_emb=rotary(model, frames, height, width),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("allegro-48vid-8txt", build, inputs(3, 4, 4, 8)),
    ZooCase("allegro-27vid-7txt", build, inputs(3, 3, 3, 7)),
    ZooCase("allegro-27vid-3txt-videomask", build, inputs(3, 3, 3, 3, video_mask=True)),
]
