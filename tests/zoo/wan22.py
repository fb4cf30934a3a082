"""Wan 2.2 TI2V (``WanTransformer3DModel`` with per-token timesteps): the pipeline's ``expand_timesteps`` gives every
video token its own timestep, a (B, F*H*W) ``timestep`` that is cut with the tokens."""

import torch
from diffusers import WanTransformer3DModel

from tests.models import tiny_wan
from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM, CHANNELS = 16, 48  # Wan 2.2's VAE has 48 latent channels


def build() -> WanTransformer3DModel:
    """A tiny Wan 2.2 TI2V-5B: patch (1, 2, 2), 48 channels in and out, head dim 12 = t 4 + h 4 + w 4."""
    return seeded_model(
        lambda: WanTransformer3DModel(
            **tiny_wan(in_channels=CHANNELS, out_channels=CHANNELS, qk_norm="rms_norm_across_heads")
        )
    )


def expanded_timestep(frames: int, height: int, width: int, t: float) -> torch.Tensor:
    """(2, F*H*W) as WanPipeline/WanImageToVideoPipeline with ``expand_timesteps``: the mask over the latents is 0 on
    the conditioning first frame and 1 elsewhere, subsampled by the patch size and scaled by ``t``."""
    mask = torch.ones(1, CHANNELS, frames, 2 * height, 2 * width)
    mask[:, :, 0] = 0
    temp_ts = (mask[0][0][:, ::2, ::2] * t).flatten()  # (F*H*W,)
    return temp_ts.unsqueeze(0).expand(2, -1)  # (B, F*H*W)


def inputs(frames: int, height: int, width: int, text: int, timestep: str):
    """Latents of ``frames`` frames of ``height x width`` patches; ``timestep`` is ``"expanded"`` (the pipeline's
    per-token timesteps), ``"per_token"`` (a different timestep for every token and sample) or ``"per_sample"``."""

    def make(model: WanTransformer3DModel) -> dict:
        tokens = frames * height * width
        if timestep == "expanded":
            t = expanded_timestep(frames, height, width, 700.0)
        elif timestep == "per_token":
            t = torch.rand(2, tokens, generator=torch.Generator().manual_seed(4)) * 1000
        else:
            t = torch.tensor([700.0, 700.0])
        return dict(
            hidden_states=randn(1, CHANNELS, frames, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1, 1),  # CFG
            timestep=t,
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            return_dict=False,
        )

    return make


CASES = [
    # 3 frames x 4 x 4 patches = 48 video tokens, per-token timesteps as the TI2V pipeline makes them.
    ZooCase("wan22-48vid-8txt-expanded", build, inputs(3, 4, 4, 8, "expanded")),
    # 27 video tokens (3 x 3 x 3), a different timestep for every token and sample.
    ZooCase("wan22-27vid-7txt-pertoken", build, inputs(3, 3, 3, 7, "per_token")),
    # The same model with a (B,) timestep (Wan 2.2 T2V/I2V): left whole by the plan.
    ZooCase("wan22-27vid-3txt-persample", build, inputs(3, 3, 3, 3, "per_sample")),
]
