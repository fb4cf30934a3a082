"""Chroma: Flux-like joint attention with a text mask over cat([text, image]) tokens."""

import torch
from diffusers import ChromaTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM = 16


def build() -> ChromaTransformer2DModel:
    return seeded_model(
        lambda: ChromaTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=TEXT_DIM,
            axes_dims_rope=(4, 6, 6),
            approximator_num_channels=16,
            approximator_hidden_dim=32,
            approximator_layers=1,
        )
    )


def inputs(height: int, width: int, text: int, masked: bool = True, dtype: torch.dtype = torch.bool):
    """``dtype=torch.float32``: the float 0/1 mask ChromaPipeline passes (its blocks add m_q * m_k to the logits)."""

    def make(model: ChromaTransformer2DModel) -> dict:
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        # the pipeline's mask: text tokens (second sample partly padded), then every image token
        mask = torch.cat([text_mask(text, dtype=dtype), torch.ones(2, height * width, dtype=dtype)], dim=1)
        return dict(
            hidden_states=randn(1, height * width, 16, seed=1).repeat(2, 1, 1),  # CFG: the same latents twice
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=img_ids.reshape(-1, 3),
            txt_ids=torch.zeros(text, 3),
            attention_mask=mask if masked else None,
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("chroma-16img-8txt", build, inputs(4, 4, 8)),
    ZooCase("chroma-15img-7txt", build, inputs(3, 5, 7)),
    ZooCase("chroma-15img-3txt-nomask", build, inputs(3, 5, 3, masked=False)),
    ZooCase("chroma-15img-7txt-floatmask", build, inputs(3, 5, 7, dtype=torch.float32)),
]
