"""SkyReels-V2: Wan-like video DiT; diffusion forcing gives every latent frame its own timestep, which the forward
repeats over the frame's tokens (a per-token modulation cut with the tokens)."""

import torch
from diffusers import SkyReelsV2Transformer3DModel

from tests.models import tiny_wan
from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM, CHANNELS = 16, 4


def build(inject_sample_info: bool):
    def make() -> SkyReelsV2Transformer3DModel:
        """Head dim 12 = t 4 + h 4 + w 4; ``inject_sample_info`` adds the fps embedding (the DF checkpoints)."""
        return seeded_model(lambda: SkyReelsV2Transformer3DModel(**tiny_wan(inject_sample_info=inject_sample_info)))

    return make


def inputs(frames: int, height: int, width: int, text: int, diffusion_forcing: bool):
    """Latents of ``frames`` frames of ``height x width`` patches. With ``diffusion_forcing``, a (B, F) timestep,
    later frames noisier (as the asynchronous schedule of SkyReelsV2DiffusionForcingPipeline), and the fps index."""

    def make(model: SkyReelsV2Transformer3DModel) -> dict:
        if diffusion_forcing:
            timestep = torch.linspace(200.0, 900.0, frames).expand(2, -1)  # (B, F)
            extra = dict(enable_diffusion_forcing=True, fps=[0])  # the pipeline's fps_embeds for 16 fps
        else:
            timestep, extra = torch.tensor([700.0, 700.0]), {}
        return dict(
            hidden_states=randn(1, CHANNELS, frames, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1, 1),  # CFG
            timestep=timestep,
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            return_dict=False,
            **extra,
        )

    return make


CASES = [
    # 3 frames x 4 x 4 patches = 48 video tokens; per-frame timesteps (frames of 16 tokens).
    ZooCase("skyreels_v2-48vid-8txt-df", build(True), inputs(3, 4, 4, 8, diffusion_forcing=True)),
    # 27 video tokens (3 x 3 x 3): frames of 9 tokens straddle the shards.
    ZooCase("skyreels_v2-27vid-7txt-df", build(True), inputs(3, 3, 3, 7, diffusion_forcing=True)),
    # Text-to-video: one timestep per sample.
    ZooCase("skyreels_v2-27vid-3txt-t2v", build(False), inputs(3, 3, 3, 3, diffusion_forcing=False)),
]
