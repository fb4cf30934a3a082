"""The model zoo under test: one file per diffusers family, each defining ``CASES``, a list of ``ZooCase``.

A case is a tiny seeded model with sharpened attention and the inputs of one forward: the doubled CFG batch
(two samples with different text), text masks where the model takes them (one sample's text partly padded), and
token counts chosen per case (some that do not divide 2 or 4). ``tests/test_zoo.py`` runs every case inside one
``Trainer.predict`` launch per layout, so adding a family is adding one file here and one plan under ``families/``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tests.models import SHARPNESS, randomize_zero_init, sharpen_attention


def first_tensor(output: Any) -> Tensor:
    """The prediction in a diffusers forward's return: ``.sample``, the first element of a tuple, or the tensor."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    raise TypeError(f"cannot find the prediction in a {type(output).__name__}")


@dataclass(frozen=True)
class ZooCase:
    """One family at one size.

    Args:
        name: ``<family>-<sizes>``, e.g. ``"hunyuan_dit-25img-7txt"``.
        build: a fresh seeded model (use ``seeded_model``).
        inputs: the forward's keyword arguments for a model built by ``build``; seeded, so every rank gets the same.
        output: picks the tensor to compare from the forward's return.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[nn.Module], dict[str, Any]]
    output: Callable[[Any], Tensor] = first_tensor


def seeded_model(factory: Callable[[], nn.Module], seed: int = 0, sharpness: float = SHARPNESS) -> nn.Module:
    """``factory()`` under ``torch.manual_seed(seed)``, zero-initialised layers randomised, attention sharpened.

    ``sharpness``: a model with many sharp attentions in a row (a self- and a cross-attention per block, both after
    q/k norms) amplifies float32 rounding past the test tolerance at the default; pass less, so that attention stays
    peaked (most of each query's weight on one key) while the model is not chaotic.
    """
    torch.manual_seed(seed)
    model = factory()
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval(), sharpness)


def randn(*shape: int, seed: int) -> Tensor:
    """Seeded standard normal values (the same on every rank)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text_mask(tokens: int, valid: tuple[int, ...] = (), dtype: torch.dtype = torch.long) -> Tensor:
    """(B, tokens) mask, 1 for real tokens; sample ``i`` has ``valid[i]`` real tokens (default: two samples,
    the first full and the second with its last 3 tokens padded)."""
    valid = valid or (tokens, max(1, tokens - 3))
    return (torch.arange(tokens)[None, :] < torch.tensor(valid)[:, None]).to(dtype)


@functools.cache
def all_cases() -> tuple[ZooCase, ...]:
    """Every case of every family file in this package, in file order."""
    cases: list[ZooCase] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        cases.extend(importlib.import_module(f"{__name__}.{info.name}").CASES)
    names = [c.name for c in cases]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    assert not duplicated, f"zoo case names are not unique: {duplicated}"
    return tuple(cases)


def family(case: ZooCase) -> str:
    return case.name.split("-", 1)[0]
