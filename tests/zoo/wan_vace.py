"""Wan VACE: the main Wan blocks plus VACE blocks over a control stream whose hints are added to the main blocks."""

import torch
from diffusers import WanVACETransformer3DModel

from tests.models import tiny_wan
from tests.zoo import ZooCase, randn, seeded_model

TEXT_DIM, CHANNELS, CONTROL_CHANNELS = 16, 4, 12
VACE_LAYERS = (0, 2)


def build() -> WanVACETransformer3DModel:
    """Three main blocks, VACE hints into blocks 0 and 2; head dim 12 = t 4 + h 4 + w 4."""
    return seeded_model(
        lambda: WanVACETransformer3DModel(
            **tiny_wan(num_layers=3, vace_layers=list(VACE_LAYERS), vace_in_channels=CONTROL_CHANNELS)
        )
    )


def inputs(frames: int, height: int, width: int, text: int, control_frames: int):
    """Latents of ``frames`` frames of ``height x width`` patches and control latents of ``control_frames`` frames
    (fewer control tokens are padded with zeros by the forward)."""

    def make(model: WanVACETransformer3DModel) -> dict:
        control = randn(1, CONTROL_CHANNELS, control_frames, 2 * height, 2 * width, seed=3)
        return dict(
            hidden_states=randn(1, CHANNELS, frames, 2 * height, 2 * width, seed=1).repeat(2, 1, 1, 1, 1),  # CFG
            timestep=torch.tensor([700, 700]),
            encoder_hidden_states=randn(2, text, TEXT_DIM, seed=2),  # conditional and unconditional text
            control_hidden_states=control.repeat(2, 1, 1, 1, 1),
            control_hidden_states_scale=torch.tensor([1.0, 0.5]),
            return_dict=False,
        )

    return make


CASES = [
    # 3 frames x 4 x 4 patches = 48 video and control tokens.
    ZooCase("wan_vace-48vid-8txt", build, inputs(3, 4, 4, 8, control_frames=3)),
    # 27 video tokens (3 x 3 x 3); 18 control tokens (2 frames), padded to 27 by the forward.
    ZooCase("wan_vace-27vid-7txt", build, inputs(3, 3, 3, 7, control_frames=2)),
]
