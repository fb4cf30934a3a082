"""The digits data: training images for the embedded DiT and sampling requests for ``Trainer.predict``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

#: Side of the images the embedded DiT works on (scikit-learn's digits are 8x8, upsampled by 2).
IMAGE_SIZE = 16
#: Digit classes 0..9; the label ``NUM_CLASSES`` is the unconditional ("null") class.
NUM_CLASSES = 10


def digit_images(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``load_digits`` as ``(images, labels)``.

    Returns:
        images (N, 1, size, size) float32 in [-1, 1] (bilinear upsampling of the 8x8 originals) and
        labels (N,) int64 in 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 8, 8) -> (N, 1, 8, 8) in [0, 1]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)  # (N, 1, size, size)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


class DigitImages(Dataset):
    """Training pairs ``(image (1, 16, 16) in [-1, 1], label)``."""

    def __init__(self, size: int = IMAGE_SIZE) -> None:
        self.images, self.labels = digit_images(size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]


class DigitRequests(Dataset):
    """``num_samples`` sampling requests ``{"index": i, "class_label": i % num_classes}``.

    The global index seeds the sample's noise, so a request yields the same image under any layout.

    Args:
        num_samples: how many samples to generate.
        num_classes: labels cycle through ``0 .. num_classes - 1``.
    """

    def __init__(self, num_samples: int = 20, num_classes: int = NUM_CLASSES) -> None:
        if num_samples < 1 or num_classes < 1:
            raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples} and {num_classes}.")
        self.num_samples = num_samples
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"request {i} out of range for {self.num_samples} samples.")
        return {"index": torch.tensor(i), "class_label": torch.tensor(i % self.num_classes)}
