"""Finding the VAEs of a module that have a cut for the parallel decode (``VaeCut``: ``plan/vae_cut.py``; the cuts of
diffusers classes live in their family files, ``families/``; lookup by class: ``registry.py``)."""

from __future__ import annotations

from torch import nn

from lightning_dit_parallel.families import builtin_vae_cuts
from lightning_dit_parallel.plan import VaeCut, is_within
from lightning_dit_parallel.registry import vae_cut_for


def is_diffusers_vae(module: nn.Module) -> bool:
    """Whether ``module`` is one of diffusers' autoencoders: a class of ``diffusers.models.autoencoders`` with a
    ``decode`` method (not one of their layers)."""
    return type(module).__module__.startswith("diffusers.models.autoencoders.") and callable(
        getattr(type(module), "decode", None)
    )


def find_vaes(root: nn.Module) -> list[tuple[str, nn.Module, VaeCut]]:
    """Every outermost submodule of ``root`` (``root`` included) whose class has a cut.

    Raises:
        ValueError: for a diffusers autoencoder without a cut (the message names the classes that have one), or
            when there is no VAE with a cut at all (``parallel_vae=True`` would change nothing).
    """
    found: list[tuple[str, nn.Module, VaeCut]] = []
    for path, module in root.named_modules():
        if any(is_within(path, p) for p, _, _ in found):
            continue
        cut = vae_cut_for(module)
        if cut is not None:
            found.append((path, module, cut))
        elif is_diffusers_vae(module) and not any(is_within(path, p) for p, _, _ in found):
            raise ValueError(
                f"parallel_vae=True: {type(module).__name__} ({path or 'the module'}) has no parallel decode; VAE"
                f" classes with one: {sorted(builtin_vae_cuts())}. Declare one with"
                " `lightning_dit_parallel.register_vae_cut(cls, VaeCut(...))`, or use parallel_vae=False."
            )
    if not found:
        classes = sorted({type(m).__name__ for _, m in root.named_children()}) or [type(root).__name__]
        raise ValueError(
            f"parallel_vae=True, but no submodule of {type(root).__name__} is a VAE with a parallel decode (children:"
            f" {classes}; VAE classes with one: {sorted(builtin_vae_cuts())})."
        )
    return found
