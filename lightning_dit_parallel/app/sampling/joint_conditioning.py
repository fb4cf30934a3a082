"""Conditionings for text-conditioned diffusers families: SD3, Flux, Wan and CogVideoX.

Each one turns the batch into the transformer's keyword arguments for the (doubled) classifier-free guidance
batch, the way the family's diffusers pipeline calls it, and returns the noise (or velocity) prediction.
The batch carries ``"prompt_embeds"`` (B, T, C) and, for SD3 and Flux, ``"pooled_embeds"`` (B, P); the
unconditional half uses ``"negative_embeds"`` / ``"negative_pooled_embeds"`` when present, zeros otherwise.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from torch import Tensor, nn

from lightning_dit_parallel.app.sampling.conditioning import _first, guided_pair


class SD3Conditioning:
    """``SD3Transformer2DModel``: latents (B, C, H, W), text (B, T, C_text) and pooled text (B, P).

    The timestep is the flow-matching timestep in [0, num_train_timesteps], as in ``StableDiffusion3Pipeline``.
    """

    def __call__(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        return _first(
            transformer(
                hidden_states=latents,
                encoder_hidden_states=guided_pair(batch, "prompt_embeds", "negative_embeds", latents, guided),
                pooled_projections=guided_pair(batch, "pooled_embeds", "negative_pooled_embeds", latents, guided),
                timestep=timestep.expand(latents.shape[0]),
                return_dict=False,
            )
        )


class FluxConditioning:
    """``FluxTransformer2DModel`` on packed latents (B, height * width, C): one token per 2x2 latent patch.

    Args:
        height: rows of the packed token grid (latent height / 2).
        width: columns of the packed token grid (latent width / 2).
        embedded_guidance: the guidance value for guidance-distilled models (``guidance_embeds=True``), which
            the model embeds like a timestep; ``None`` for models without it.
    """

    def __init__(self, height: int, width: int, embedded_guidance: float | None = None) -> None:
        if height < 1 or width < 1:
            raise ValueError(f"FluxConditioning needs a positive token grid, got height={height}, width={width}.")
        self.height = height
        self.width = width
        self.embedded_guidance = embedded_guidance

    def image_ids(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(height * width, 3) position ids (0, row, column), as ``FluxPipeline._prepare_latent_image_ids``."""
        rows = torch.arange(self.height, device=device).repeat_interleave(self.width)  # (h*w,)
        cols = torch.arange(self.width, device=device).repeat(self.height)  # (h*w,)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)  # (h*w, 3)

    def __call__(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        if latents.shape[1] != self.height * self.width:
            raise ValueError(
                f"FluxConditioning(height={self.height}, width={self.width}) expects {self.height * self.width} packed"
                f" tokens, got latents {tuple(latents.shape)} (B, S, C)."
            )
        embeds = getattr(transformer.config, "guidance_embeds", False)
        if embeds != (self.embedded_guidance is not None):
            raise ValueError(
                f"guidance_embeds={embeds} needs embedded_guidance to be set exactly when the model embeds guidance;"
                f" got embedded_guidance={self.embedded_guidance}."
            )
        text = guided_pair(batch, "prompt_embeds", "negative_embeds", latents, guided)
        batch_size = latents.shape[0]
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((batch_size,), self.embedded_guidance, device=latents.device, dtype=latents.dtype)
        return _first(
            transformer(
                hidden_states=latents,
                encoder_hidden_states=text,
                pooled_projections=guided_pair(batch, "pooled_embeds", "negative_pooled_embeds", latents, guided),
                timestep=(timestep / 1000).expand(batch_size).to(latents.dtype),  # the model multiplies by 1000
                img_ids=self.image_ids(latents.device, latents.dtype),
                txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype),  # (T, 3)
                guidance=guidance,
                return_dict=False,
            )
        )


class WanConditioning:
    """``WanTransformer3DModel``: video latents (B, C, F, H, W) and text (B, T, C_text)."""

    def __call__(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        return _first(
            transformer(
                hidden_states=latents,
                timestep=timestep.expand(latents.shape[0]),
                encoder_hidden_states=guided_pair(batch, "prompt_embeds", "negative_embeds", latents, guided),
                return_dict=False,
            )
        )


class CogVideoXConditioning:
    """``CogVideoXTransformer3DModel``: video latents (B, F, C, H, W) and text (B, T, C_text).

    Models with ``use_rotary_positional_embeddings`` get the 3-D rotary embedding of the latent grid, computed as
    ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` does.
    """

    def __call__(self, transformer: nn.Module, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        config = transformer.config
        rotary = None
        if config.use_rotary_positional_embeddings:
            frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
            rotary = cogvideox_rotary_embedding(config, frames, height, width, latents.device)
        return _first(
            transformer(
                hidden_states=latents,
                encoder_hidden_states=guided_pair(batch, "prompt_embeds", "negative_embeds", latents, guided),
                timestep=timestep.expand(latents.shape[0]),
                image_rotary_emb=rotary,
                return_dict=False,
            )
        )


def cogvideox_rotary_embedding(
    config, frames: int, height: int, width: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(freqs_cos, freqs_sin), each (F' * H/p * W/p, head_dim), for latents of ``frames`` x ``height`` x ``width``."""
    p, p_t = config.patch_size, config.patch_size_t
    grid_h, grid_w = height // p, width // p
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if p_t is None:  # CogVideoX 1.0: the grid is resized into the training grid, centred
        if grid_h / grid_w > base_h / base_w:
            resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
        else:
            resize_h, resize_w = int(round(base_w / grid_w * grid_h)), base_w
        top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
        return get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim,
            crops_coords=((top, left), (top + resize_h, left + resize_w)),
            grid_size=(grid_h, grid_w),
            temporal_size=frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        embed_dim=config.attention_head_dim,
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )
