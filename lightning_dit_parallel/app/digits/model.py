"""The embedded digits DiT: its architecture, the shipped weights and a ready-made sampler."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler
from safetensors.torch import load_file

from lightning_dit_parallel.app.digits.data import IMAGE_SIZE, NUM_CLASSES
from lightning_dit_parallel.app.sampling import ClassConditioning, DiffusionSampler, ToUnitRange

#: Architecture of the embedded model: 64 tokens (16x16 pixels, patch 2), 4 heads so Ulysses degrees 2 and 4 work.
DIGITS_DIT_CONFIG: dict[str, Any] = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=1,
    out_channels=1,
    num_layers=4,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_num_groups=1,
)

#: The training noise schedule; sampling schedulers are built from it so that they match.
DIGITS_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True
)

WEIGHTS_FILE = "digits_dit.safetensors"
CONFIG_FILE = "digits_dit.json"

SchedulerName = Literal["ddim", "dpmsolver"]


def weights_dir() -> Path:
    """The package folder that holds the shipped weights and their config."""
    return Path(str(resources.files("lightning_dit_parallel.app.digits") / "weights"))


def build_digits_dit(config: dict[str, Any] | None = None, seed: int = 0) -> DiTTransformer2DModel:
    """A freshly initialised (seeded) digits DiT; ``config`` defaults to ``DIGITS_DIT_CONFIG``."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**(config or DIGITS_DIT_CONFIG))


def read_metadata(directory: Path | None = None) -> dict[str, Any]:
    """The JSON written next to the weights: ``transformer`` config, ``schedule`` and ``training`` facts."""
    path = (directory or weights_dir()) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"No digits DiT config at {path}; train one with `python -m lightning_dit_parallel.app.digits.train`."
        )
    return json.loads(path.read_text())


def load_digits_dit(directory: Path | None = None) -> DiTTransformer2DModel:
    """The trained digits DiT (eval mode, float32) from the package's ``weights/`` folder or ``directory``."""
    directory = directory or weights_dir()
    model = build_digits_dit(read_metadata(directory)["transformer"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval()


def digits_scheduler(name: SchedulerName = "ddim", schedule: dict[str, Any] | None = None):
    """A deterministic sampling scheduler on the training schedule (DDIM with eta=0, or DPM-Solver++)."""
    schedule = dict(schedule or DIGITS_SCHEDULE)
    if name == "ddim":
        return DDIMScheduler(**schedule, set_alpha_to_one=False)
    if name == "dpmsolver":
        # Pixel space: clip the predicted clean sample (thresholding to [-1, 1]) instead of clip_sample; the
        # cosine schedule needs lambda clipped at its noisy end, or the first data prediction divides by ~0.
        schedule.pop("clip_sample", None)
        return DPMSolverMultistepScheduler(
            **schedule, algorithm_type="dpmsolver++", lambda_min_clipped=-5.1, thresholding=True, sample_max_value=1.0
        )
    raise ValueError(f"scheduler must be 'ddim' or 'dpmsolver', got {name!r}.")


def digits_sampler(
    num_inference_steps: int = 25,
    guidance_scale: float = 2.0,
    scheduler: SchedulerName = "ddim",
    seed: int = 0,
    weights: str | None = None,
) -> DiffusionSampler:
    """``DiffusionSampler`` over the shipped digits DiT; ``predict_step`` returns (B, 1, 16, 16) images in [0, 1].

    Args:
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale (1.0 turns guidance off).
        scheduler: ``"ddim"`` or ``"dpmsolver"``; both deterministic, so results do not depend on the layout.
        seed: base seed of the per-sample noise.
        weights: a folder with other trained weights (default: the package's ``weights/``).
    """
    directory = Path(weights) if weights else None
    schedule = read_metadata(directory).get("schedule", DIGITS_SCHEDULE)
    return DiffusionSampler(
        load_digits_dit(directory),
        digits_scheduler(scheduler, schedule),
        ClassConditioning(null_class=NUM_CLASSES, out_channels=1),
        latent_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        decode=ToUnitRange(),
    )
