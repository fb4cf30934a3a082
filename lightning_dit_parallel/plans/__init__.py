"""Plans that ship for diffusers transformer families, found by class name.

Each family's plan lives in its own module; this index maps diffusers class names to them so that
importing the package does not import every diffusers model.
"""

from __future__ import annotations

import importlib

from lightning_dit_parallel.plan import DiTPlan

#: diffusers class name -> module (in this package) that defines ``PLAN`` for it.
_BUILTIN: dict[str, str] = {
    "DiTTransformer2DModel": "lightning_dit_parallel.plans.dit",
    "PixArtTransformer2DModel": "lightning_dit_parallel.plans.pixart",
    "SD3Transformer2DModel": "lightning_dit_parallel.plans.sd3",
    "FluxTransformer2DModel": "lightning_dit_parallel.plans.flux",
    "WanTransformer3DModel": "lightning_dit_parallel.plans.wan",
    "CogVideoXTransformer3DModel": "lightning_dit_parallel.plans.cogvideox",
}


def builtin_plan(cls: type) -> DiTPlan | None:
    """The plan shipped for a diffusers class, or ``None``."""
    if not cls.__module__.startswith("diffusers.") or cls.__name__ not in _BUILTIN:
        return None
    return importlib.import_module(_BUILTIN[cls.__name__]).PLAN
