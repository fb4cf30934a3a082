"""The embedded example: a small class-conditional DiT trained on scikit-learn's 8x8 digits (upsampled to 16x16)."""

from lightning_dit_parallel.app.digits.data import DigitImages, DigitRequests, digit_images
from lightning_dit_parallel.app.digits.model import build_digits_dit, digits_sampler, load_digits_dit

__all__ = ["DigitImages", "DigitRequests", "build_digits_dit", "digit_images", "digits_sampler", "load_digits_dit"]
