"""Qwen-Image: joint attention over text then image tokens with a text mask; the zero_cond_t (edit 2511) variant
modulates target and condition-image tokens per token (a modulation index passed to every block)."""

import torch
from diffusers import QwenImageTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM = 16


def build(zero_cond_t: bool = False, use_layer3d_rope: bool = False):
    """``use_layer3d_rope``: Qwen-Image-Layered's rotary (another ``pos_embed`` class)."""
    return lambda: seeded_model(
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            axes_dims_rope=(4, 6, 6),
            zero_cond_t=zero_cond_t,
            use_layer3d_rope=use_layer3d_rope,
        )
    )


def inputs(shapes: list[tuple[int, int]], text: int, masked: bool = True):
    """Packed latents of the images ``shapes`` (height, width in tokens; target first, then condition images)."""
    tokens = sum(h * w for h, w in shapes)

    def make(model: QwenImageTransformer2DModel) -> dict:
        return dict(
            hidden_states=randn(1, tokens, 16, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            encoder_hidden_states_mask=text_mask(text) if masked else None,
            timestep=torch.tensor([0.5, 0.5]),
            img_shapes=[[(1, h, w) for h, w in shapes]] * 2,
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("qwenimage-16img-8txt", build(), inputs([(4, 4)], 8)),
    ZooCase("qwenimage-15img-7txt", build(), inputs([(3, 5)], 7)),
    ZooCase("qwenimage-15img-3txt-nomask", build(), inputs([(3, 5)], 3, masked=False)),
    # zero_cond_t: a 3x5 target and a 2x2 condition image, 19 tokens in all
    ZooCase("qwenimage-zerocond-19img-7txt", build(zero_cond_t=True), inputs([(3, 5), (2, 2)], 7)),
    # Qwen-Image-Layered: layer3d rotary over a 3x5 image and a 2x2 layer
    ZooCase("qwenimage-layered-19img-7txt", build(use_layer3d_rope=True), inputs([(3, 5), (2, 2)], 7)),
]
