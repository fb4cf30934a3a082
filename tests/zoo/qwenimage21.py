"""Qwen-Image 2.1: one joint sequence of text, condition-image and target-image tokens with block-causal attention
(causal over the sequence, bidirectional inside each image; the SDPA processor makes one attention call per prefix
segment, sliced by global token positions) and per-token modulation (condition tokens from t = 0). Exact under
Ulysses through the all-to-all at the attention projections (``HeadProjections``); Ring is refused (test_zoo skips
the family in Ring and USP layouts and checks the refusal)."""

import torch
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

from tests.zoo import ZooCase, randn, seeded_model

CONTEXT_DIM, CHANNELS = 16, 16


def build():
    return seeded_model(
        lambda: QwenImage21Transformer2DModel(
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            context_in_dim=CONTEXT_DIM,
            axes_dims_rope=(4, 6, 6),
        )
    )


def inputs(text_rows: int, condition_slot: int | None, target: tuple[int, int], masked: bool = True):
    """``text_rows`` encoder rows, one of them (``condition_slot``) a 2x2 condition image's slot; the target image
    (``target`` height x width latent tokens, 4 per slot) is appended. Joint tokens: text rows - 1 + 4 + h * w."""
    height, width = target
    condition = [] if condition_slot is None else [(1, 2, 2)]
    image_tokens = 4 * len(condition) + height * width

    def make(model: QwenImage21Transformer2DModel) -> dict:
        slots = torch.zeros(text_rows + height * width // 4, dtype=torch.bool)  # (vlm length,) True at image slots
        if condition_slot is not None:
            slots[condition_slot] = True
        slots[text_rows:] = True  # the target's slots, appended
        valid = torch.ones(2, text_rows, dtype=torch.bool)
        if masked:
            valid[1, -2:] = False  # the second prompt's last two rows are padding
        return dict(
            hidden_states=randn(1, image_tokens, CHANNELS, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text_rows, CONTEXT_DIM, seed=2),
            timestep=torch.tensor([0.5, 0.5]),
            img_shapes=[[*condition, (1, height, width)]] * 2,
            img_mask=slots[None].repeat(2, 1),
            encoder_hidden_states_mask=valid if masked else None,
            return_dict=False,
        )

    return make


CASES = [
    # 5 text + 4 condition + 12 target tokens = 21 joint tokens (divides neither 2 nor 4)
    ZooCase("qwenimage21-21joint-cond-masked", build, inputs(6, 2, (3, 4))),
    # 7 text + 8 target tokens = 15, no condition image, no text mask
    ZooCase("qwenimage21-15joint-nomask", build, inputs(7, None, (2, 4), masked=False)),
]
