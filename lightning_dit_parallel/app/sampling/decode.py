"""Decoders from final latents to outputs for pixel-space models."""

from __future__ import annotations

from torch import Tensor


class ToUnitRange:
    """Map pixel-space samples from [-1, 1] to images in [0, 1] (clamped)."""

    def __call__(self, latents: Tensor) -> Tensor:
        return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
