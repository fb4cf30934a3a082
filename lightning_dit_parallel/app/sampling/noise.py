"""Initial noise derived from the global sample index, so a sample is the same whatever the layout."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_noise(
    indices: Tensor, shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """One standard-normal tensor of ``shape`` per sample, seeded by ``(seed, index)``.

    Args:
        indices: (B,) global sample indices.
        shape: the shape of one sample's latent, e.g. (C, H, W).

    Returns:
        (B, *shape) noise; sample ``i`` depends only on ``seed`` and ``indices[i]``.
    """
    samples = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        samples.append(torch.randn(shape, generator=generator))
    return torch.stack(samples).to(device=device, dtype=dtype)  # B x (*shape) -> (B, *shape)
