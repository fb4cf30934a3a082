"""HiDream-I1: T5 and per-block Llama text streams, mixture-of-experts feed-forwards, token-masked non-square
latents."""

import torch
from diffusers import HiDreamImageTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model

T5_DIM, LLAMA_DIM, POOLED_DIM, LLAMA_LAYERS = 16, 12, 8, 3


def build() -> HiDreamImageTransformer2DModel:
    # max_resolution (6, 6) / patch 2: non-square latents are padded to 9 tokens
    return seeded_model(
        lambda: HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            caption_channels=[T5_DIM, LLAMA_DIM],
            text_emb_dim=POOLED_DIM,
            num_routed_experts=4,
            num_activated_experts=2,
            axes_dims_rope=(4, 6, 6),
            max_resolution=(6, 6),
            llama_layers=[0, 2],
        )
    )


def inputs(height: int, width: int, t5: int, llama: int, patched: bool = False):
    def make(model: HiDreamImageTransformer2DModel) -> dict:
        # CFG: the same latents twice; (B, C, 2h, 2w) -> h*w tokens of patch 2 (padded if h != w)
        latents = randn(1, 4, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1)
        if patched:  # the caller patchifies: (B, max_seq, p*p*C) tokens with their mask, ids and grid sizes
            tokens, masks, sizes, ids = model.patchify(latents)
            latents = dict(hidden_states=tokens, hidden_states_masks=masks, img_sizes=sizes, img_ids=ids)
        else:
            latents = dict(hidden_states=latents)
        return dict(
            **latents,
            timesteps=torch.tensor([500.0, 500.0]),
            encoder_hidden_states_t5=randn(2, t5, T5_DIM, seed=2),  # conditional and unconditional text
            encoder_hidden_states_llama3=randn(LLAMA_LAYERS, 2, llama, LLAMA_DIM, seed=3),
            pooled_embeds=randn(2, POOLED_DIM, seed=4),
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("hidream-16img-8t5-4llama", build, inputs(4, 4, 8, 4)),
    ZooCase("hidream-25img-7t5-3llama", build, inputs(5, 5, 7, 3)),
    # 3 x 2 patches padded to 9 tokens, with a token mask
    ZooCase("hidream-9img-5t5-3llama-nonsquare", build, inputs(3, 2, 5, 3)),
    ZooCase("hidream-9img-3t5-5llama-patched", build, inputs(2, 3, 3, 5, patched=True)),
]
