"""Save image tensors in [0, 1] as PNG files: one grid and one file per sample."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C in (1, 3), got shape {tuple(images.shape)}.")


def to_pil(image: Tensor, scale: int = 1) -> Image.Image:
    """One image (C, H, W) in [0, 1] as a PIL image, enlarged ``scale`` times (nearest neighbour)."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # (C, H, W)
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()  # (H, W) or (H, W, 3)
    picture = Image.fromarray(array)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def make_grid(images: Tensor, columns: int = 10, padding: int = 1) -> Tensor:
    """Tile (N, C, H, W) images row by row into one (C, rows*(H+p)+p, columns*(W+p)+p) image on black."""
    _check_images(images)
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = torch.zeros(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i, image in enumerate(images.detach().float().cpu()):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    return grid


def save_grid(images: Tensor, path: Path, columns: int = 10, scale: int = 4) -> Path:
    """Write ``images`` (N, C, H, W) in [0, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(make_grid(images, columns), scale).save(path)
    return path


def save_images(images: Tensor, names: list[str], directory: Path, scale: int = 4) -> list[Path]:
    """Write one PNG per image, ``<directory>/<name>.png``; returns the paths."""
    _check_images(images)
    if len(names) != images.shape[0]:
        raise ValueError(f"need one name per image, got {len(names)} names for {images.shape[0]} images.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.png" for name in names]
    for image, path in zip(images, paths):
        to_pil(image, scale).save(path)
    return paths
