"""HunyuanDiT (self-attention with 2-D rotary, cross-attention to CLIP + T5 text, long skip connections: 4 blocks,
the output of block 0 goes into block 3)."""

import torch
from diffusers import HunyuanDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed

from tests.zoo import ZooCase, randn, seeded_model, text_mask

CLIP_DIM, T5_DIM, HEADS, HEAD_DIM = 16, 16, 4, 8
#: q/k scale: 8 sharp attentions in a row (self and cross per block, after q/k LayerNorms) make the model chaotic at
#: the default 6 (a 1e-7 input change moves the output by 1e-3); at 3 a query still puts about 0.85 of its weight
#: on one key.
SHARPNESS = 3.0


def build(clip: int, t5: int, meta: bool):
    def factory() -> HunyuanDiT2DModel:
        return seeded_model(
            lambda: HunyuanDiT2DModel(
                num_attention_heads=HEADS,
                attention_head_dim=HEAD_DIM,
                in_channels=4,
                patch_size=2,
                sample_size=8,
                hidden_size=HEADS * HEAD_DIM,
                num_layers=4,
                cross_attention_dim=CLIP_DIM,
                cross_attention_dim_t5=T5_DIM,
                pooled_projection_dim=16,
                text_len=clip,
                text_len_t5=t5,
                use_style_cond_and_image_meta_size=meta,
            ),
            sharpness=SHARPNESS,
        )

    return factory


def inputs(height: int, width: int, clip: int, t5: int, meta: bool):
    """Post-patch grid ``height x width``; ``clip`` and ``t5`` text tokens (the second sample's partly padded)."""

    def make(model: HunyuanDiT2DModel) -> dict:
        cos, sin = get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), (height, width)), (height, width))  # 2 x (S, D)
        meta_size = torch.tensor([[16.0, 16, 16, 16, 0, 0]] * 2)  # original size, target size, crop corner
        extra = dict(image_meta_size=meta_size, style=torch.zeros(2, dtype=torch.long))
        return dict(
            hidden_states=randn(1, 4, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1),  # CFG: the same latents twice
            timestep=torch.tensor([500.0, 500.0]),
            encoder_hidden_states=randn(2, clip, CLIP_DIM, seed=2),
            text_embedding_mask=text_mask(clip),
            encoder_hidden_states_t5=randn(2, t5, T5_DIM, seed=3),
            text_embedding_mask_t5=text_mask(t5),
            image_rotary_emb=(cos, sin),
            return_dict=False,
            **(extra if meta else {}),
        )

    return make


CASES = [
    ZooCase("hunyuan_dit-16img-8txt", build(4, 4, True), inputs(4, 4, 4, 4, True)),
    ZooCase("hunyuan_dit-15img-7txt", build(4, 3, False), inputs(3, 5, 4, 3, False)),
]
