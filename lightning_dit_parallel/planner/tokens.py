"""How many tokens a work gives: the latent grid from the pixels, the VAE's compression and the patch size.

The VAE's factors come from its config when one is given; otherwise from the family file's ``LATENTS`` (the public
defaults of the families shipped with plans), otherwise 8x spatially, 4x temporally for a DiT with a 3-D patch,
latent channels as the DiT's output channels. A DiT whose input has several latent channels per token without a
patch embedding (Flux packs 2x2 latent pixels into one 64-channel token: ``in_channels = 4 * latent_channels``
with ``patch_size=1``) gets the packing from the channel ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_dit_parallel.families import builtin_latents
from lightning_dit_parallel.planner.components import VaeSpec
from lightning_dit_parallel.planner.work import Work


@dataclass(frozen=True)
class LatentGrid:
    """The latent of one sample and its tokens.

    Args:
        frames, height, width: latent frames, rows and columns.
        tokens: tokens of the latent sequence after patching.
        spatial, temporal: the VAE compression used.
        latent_channels: channels of the latent.
        patch: (frames, rows, columns) of latent per token.
    """

    frames: int
    height: int
    width: int
    tokens: int
    spatial: int
    temporal: int
    latent_channels: int
    patch: tuple[int, int, int]


def patch_sizes(config: dict) -> tuple[int, int, int]:
    """``(t, h, w)`` latent cells per token from a DiT config's ``patch_size`` (int or (t, h, w)) and
    ``patch_size_t``."""
    patch = config.get("patch_size") or 1
    if isinstance(patch, (list, tuple)):
        values = [int(p) for p in patch]
        if len(values) == 1:
            values = [1, values[0], values[0]]
        pt, ph, pw = ([1] * (3 - len(values)) + values)[:3]
    else:
        pt, ph, pw = 1, int(patch), int(patch)
    if config.get("patch_size_t"):
        pt = int(config["patch_size_t"])
    return pt, ph, pw


def vae_factors(cls: str, config: dict, vae: VaeSpec | None) -> tuple[int, int, int]:
    """``(spatial, temporal, latent channels)``: from the VAE when known, else the family, else the fallback."""
    if vae is not None and vae.latent_channels:
        return vae.spatial, vae.temporal, vae.latent_channels
    latent = builtin_latents().get(cls)
    if latent is not None:
        return latent.spatial, latent.temporal, latent.channels
    three_d = isinstance(config.get("patch_size"), (list, tuple)) or bool(config.get("patch_size_t"))
    channels = config.get("out_channels") or config.get("in_channels") or 4
    return 8, 4 if three_d else 1, int(channels)


def latent_grid(cls: str, config: dict, vae: VaeSpec | None, work: Work) -> LatentGrid:
    """The latent grid and token count of one sample of ``work`` for a DiT of class ``cls`` with ``config``.

    Raises:
        ValueError: when height or width is not a multiple of the VAE compression times the patch.
    """
    spatial, temporal, channels = vae_factors(cls, config, vae)
    pt, ph, pw = patch_sizes(config)
    in_channels = int(config.get("in_channels") or channels)
    packed = in_channels // (channels * pt * ph * pw) if channels else 1
    side = math.isqrt(packed) if packed >= 4 else 1
    if side * side == packed and side > 1:
        ph, pw = ph * side, pw * side
    if work.tokens is not None:
        rows = max(1, math.isqrt(work.tokens)) * ph
        return LatentGrid(1, rows, rows, work.tokens, spatial, temporal, channels, (pt, ph, pw))
    step_h, step_w = spatial * ph, spatial * pw
    if work.height % step_h or work.width % step_w:
        raise ValueError(
            f"height={work.height} and width={work.width} must be multiples of {step_h} and {step_w} (VAE compression"
            f" {spatial} x patch {ph}x{pw} of {cls})."
        )
    frames = work.frames or 1
    latent_frames = (frames - 1) // temporal + 1 if temporal > 1 else frames
    token_frames = -(-latent_frames // pt)
    lh, lw = work.height // spatial, work.width // spatial
    return LatentGrid(
        latent_frames, lh, lw, token_frames * (lh // ph) * (lw // pw), spatial, temporal, channels, (pt, ph, pw)
    )
