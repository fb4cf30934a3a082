"""HunyuanVideo 1.5: dual-stream blocks only; the text stream is [image tokens, ByT5 tokens, MLLM tokens] with
the valid tokens of each sample moved first, built inside the forward; joint attention over [video, text] with
a query-and-key text mask built in the attention processor."""

import torch
from diffusers import HunyuanVideo15Transformer3DModel

from tests.zoo import ZooCase, randn, seeded_model, text_mask

TEXT_DIM, BYT5_DIM, IMAGE_DIM, CHANNELS = 16, 12, 8, 4


def build() -> HunyuanVideo15Transformer3DModel:
    # patch size 1; head dim 16 = rotary axes (4, 6, 6); two blocks, one refiner block
    return seeded_model(
        lambda: HunyuanVideo15Transformer3DModel(
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            num_attention_heads=4,
            attention_head_dim=16,
            num_layers=2,
            num_refiner_layers=1,
            text_embed_dim=TEXT_DIM,
            text_embed_2_dim=BYT5_DIM,
            image_embed_dim=IMAGE_DIM,
            rope_axes_dim=(4, 6, 6),
        )
    )


def inputs(frames: int, height: int, width: int, text: int, byt5: int, image: int, i2v: bool):
    """``frames`` x ``height`` x ``width`` video tokens; ``image`` + ``byt5`` + ``text`` text-stream tokens with the
    second sample's text partly padded; without ``i2v`` the image embeddings are zeros (text-to-video), which the
    forward masks out."""

    def make(model: HunyuanVideo15Transformer3DModel) -> dict:
        latents = randn(1, CHANNELS, frames, height, width, seed=1)
        image_embeds = randn(1, image, IMAGE_DIM, seed=4).repeat(2, 1, 1) if i2v else torch.zeros(2, image, IMAGE_DIM)
        return dict(
            hidden_states=latents.repeat(2, 1, 1, 1, 1),  # CFG: the same latents twice
            timestep=torch.tensor([500.0, 500.0]),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            encoder_attention_mask=text_mask(text),
            encoder_hidden_states_2=randn(2, byt5, BYT5_DIM, seed=3),
            encoder_attention_mask_2=text_mask(byt5, (byt5, 1)),
            image_embeds=image_embeds,
            return_dict=False,
        )

    return make


CASES = [
    ZooCase("hunyuan_video15-16vid-8txt", build, inputs(2, 2, 4, text=4, byt5=2, image=2, i2v=True)),
    ZooCase("hunyuan_video15-27vid-7txt", build, inputs(3, 3, 3, text=4, byt5=2, image=1, i2v=False)),
]
