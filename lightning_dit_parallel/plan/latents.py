"""The latent format of a family's VAE, as a family file declares it for its DiT classes (``LATENTS``): what the
planner uses to count a sample's tokens when a pipeline folder does not hold the VAE's config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentFormat:
    """How the family's VAE compresses an image or video into the latent the DiT receives.

    Args:
        spatial: pixels per latent row and column.
        temporal: video frames per latent frame (1 for images).
        channels: channels of the latent.
    """

    spatial: int
    temporal: int
    channels: int

    def __post_init__(self) -> None:
        if min(self.spatial, self.temporal, self.channels) < 1:
            raise ValueError(f"LatentFormat fields must be positive; got {self}.")
