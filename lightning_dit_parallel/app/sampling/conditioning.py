"""How a transformer family is called with the doubled (unconditional, conditional) batch.

A conditioning turns the batch into the transformer's keyword arguments for classifier-free guidance
and picks the noise prediction out of the transformer's output.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class Conditioning(Protocol):
    def __call__(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        """Noise prediction for ``latents``.

        With ``guided`` the latents are the doubled batch ``cat([x, x])`` and the first half must be
        unconditional, the second conditional.
        """


def _first(output) -> Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def guided_pair(batch: dict, key: str, negative_key: str, like: Tensor, guided: bool) -> Tensor:
    """``batch[key]`` on ``like``'s device and dtype, preceded by its unconditional counterpart when guided.

    Returns:
        (B, ...) or, with ``guided``, (2B, ...) = cat([negative or zeros, conditional]).
    """
    if key not in batch:
        raise ValueError(f"The batch has no {key!r} (keys: {sorted(batch)}); this conditioning needs it.")
    cond = batch[key].to(device=like.device, dtype=like.dtype)
    if not guided:
        return cond
    uncond = batch.get(negative_key)
    uncond = torch.zeros_like(cond) if uncond is None else uncond.to(cond)
    return torch.cat([uncond, cond])  # (B, ...) -> (2B, ...)


class ClassConditioning:
    """Class-conditional models (diffusers ``DiTTransformer2DModel``): ``batch["class_label"]`` (B,).

    Args:
        null_class: the label of the unconditional class (the number of classes, for DiT).
        out_channels: channels of the noise prediction; extra channels (learned sigma) are dropped.
    """

    def __init__(self, null_class: int, out_channels: int) -> None:
        self.null_class = null_class
        self.out_channels = out_channels

    def __call__(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        labels = batch["class_label"].to(latents.device)
        if guided:
            labels = torch.cat([torch.full_like(labels, self.null_class), labels])  # (B,) -> (2B,)
        t = timestep.expand(latents.shape[0])
        out = _first(transformer(latents, timestep=t, class_labels=labels, return_dict=False))
        return out[:, : self.out_channels]


class TextConditioning:
    """Text-conditioned models with cross-attention (diffusers ``PixArtTransformer2DModel``).

    ``batch["prompt_embeds"]`` (B, T, C) and optionally ``batch["negative_embeds"]`` (B, T, C); without the
    latter the unconditional embedding is zeros.

    Args:
        out_channels: channels of the noise prediction; extra channels (learned sigma) are dropped.
    """

    def __init__(self, out_channels: int) -> None:
        self.out_channels = out_channels

    def __call__(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        cond = guided_pair(batch, "prompt_embeds", "negative_embeds", latents, guided)  # (B or 2B, T, C)
        t = timestep.expand(latents.shape[0])
        out = _first(
            transformer(
                latents,
                encoder_hidden_states=cond,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )
        )
        return out[:, : self.out_channels]
