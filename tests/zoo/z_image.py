"""Z-Image: per-sample lists of latents and captions; refiner blocks over the image and the caption, then one joint
[image, caption] sequence per sample. Every stream is padded to a multiple of 32 tokens inside the forward (the
pad tokens take part in attention), so token counts always divide 2 and 4; captions of different lengths give a
padding mask."""

import torch
from diffusers import ZImageTransformer2DModel

from tests.zoo import ZooCase, randn, seeded_model

CAP_DIM, SIGLIP_DIM = 16, 8


def build(siglip_dim: int | None = None):
    return lambda: seeded_model(
        lambda: ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=64,
            n_layers=2,
            n_refiner_layers=2,
            n_heads=4,
            n_kv_heads=4,
            cap_feat_dim=CAP_DIM,
            siglip_feat_dim=siglip_dim,
            axes_dims=[4, 6, 6],
            axes_lens=[256, 32, 32],
        )
    )


def inputs(height: int, width: int, captions: tuple[int, int]):
    """``height`` x ``width`` image tokens (patch size 2); the two samples' caption lengths."""

    def make(model: ZImageTransformer2DModel) -> dict:
        latents = randn(4, 1, 2 * height, 2 * width, seed=1)
        return dict(
            x=[latents, latents],  # CFG: the same latents twice
            t=torch.tensor([0.5, 0.5]),
            cap_feats=[randn(n, CAP_DIM, seed=2 + i) for i, n in enumerate(captions)],  # conditional, unconditional
            return_dict=False,
        )

    return make


def omni_inputs(condition: tuple[int, int], target: tuple[int, int], captions: tuple[tuple[int, ...], ...]):
    """Omni mode: a clean condition image (with SigLIP features) and the noisy target image per sample, and the
    caption chunks around them (one more chunk than images), per sample."""

    def make(model: ZImageTransformer2DModel) -> dict:
        images = [randn(4, 1, 2 * h, 2 * w, seed=1 + i) for i, (h, w) in enumerate((condition, target))]
        return dict(
            x=[images, images],  # CFG: the same latents twice
            t=torch.tensor([0.5, 0.5]),
            cap_feats=[
                [randn(n, CAP_DIM, seed=10 * i + j) for j, n in enumerate(chunks)] for i, chunks in enumerate(captions)
            ],
            siglip_feats=[[randn(*condition, SIGLIP_DIM, seed=3), None]] * 2,
            image_noise_mask=[[0, 1], [0, 1]],
            return_dict=False,
        )

    return make


def stacked(output) -> torch.Tensor:
    """The forward returns one (C, F, H, W) tensor per sample."""
    return torch.stack(output[0])


CASES = [
    # captions padded to 32 and 64 tokens: joint lengths 64 and 96, with a padding mask
    ZooCase("z_image-16img-8txt-40txt", build(), inputs(4, 4, (8, 40)), stacked),
    # both captions padded to 32 tokens: no mask
    ZooCase("z_image-15img-7txt-3txt", build(), inputs(3, 5, (7, 3)), stacked),
    # omni: per-token noise masks (clean condition, noisy target); caption chunks of 32+32+32 and 32+64+32 tokens
    ZooCase(
        "z_image-omni-4img-15img", build(SIGLIP_DIM), omni_inputs((2, 2), (3, 5), ((3, 5, 2), (3, 40, 2))), stacked
    ),
]
