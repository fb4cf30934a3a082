"""``DiffusionSampler``: the scheduler loop with classifier-free guidance as a LightningModule."""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor, nn

from lightning_dit_parallel.app.sampling.conditioning import Conditioning
from lightning_dit_parallel.app.sampling.noise import sample_noise


class DiffusionSampler(L.LightningModule):
    """Generates samples from a diffusers transformer in ``predict_step``.

    The batch is a dict with ``"index"`` (B,) global sample indices (they seed the noise) and whatever the
    conditioning reads (``"class_label"``, ``"prompt_embeds"`` ...). ``predict_step`` returns the decoded
    samples (B, ...) on every rank.

    Args:
        transformer: the DiT (any module with a plan).
        scheduler: a diffusers scheduler (deterministic ones, e.g. DDIM with eta=0 or flow-matching Euler,
            give layout-independent results).
        conditioning: calls the transformer with the (doubled) batch; see ``Conditioning``.
        latent_shape: the shape of one sample's latent, e.g. (C, H, W).
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale; ``1.0`` turns guidance (and the doubled batch) off.
        seed: base seed of the per-sample noise.
        decode: maps final latents to outputs: a VAE decode for latent models, ``ToUnitRange()`` for pixel-space
            models trained on [-1, 1] (images in [0, 1]); identity by default.
    """

    def __init__(
        self,
        transformer: nn.Module,
        scheduler,
        conditioning: Conditioning,
        latent_shape: tuple[int, ...],
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        seed: int = 0,
        decode: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        self.transformer = transformer
        self.scheduler = scheduler
        self.conditioning = conditioning
        self.latent_shape = tuple(latent_shape)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.decode = decode

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @torch.no_grad()
    def sample(self, batch: dict) -> Tensor:
        """Run the whole denoising loop for one batch; returns decoded samples (B, ...)."""
        dtype = next(self.transformer.parameters()).dtype
        latents = sample_noise(batch["index"], self.latent_shape, self.seed, self.device, dtype)  # (B, *latent)
        scheduler = copy.deepcopy(self.scheduler)  # schedulers keep per-loop state
        scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if self.guided else latents  # (B, ...) -> (2B, ...)
            model_in = scheduler.scale_model_input(model_in, t) if hasattr(scheduler, "scale_model_input") else model_in
            pred = self.conditioning(self.transformer, model_in, t.reshape(1).to(self.device), batch, self.guided)
            if self.guided:
                uncond, cond = pred.chunk(2)  # (2B, ...) -> 2 x (B, ...)
                pred = uncond + self.guidance_scale * (cond - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        return latents if self.decode is None else self.decode(latents)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.sample(batch)
