"""Forward-hook helpers shared by the parallelizers: removing installed hooks, and swapping
``F.scaled_dot_product_attention`` for another kernel while one module's forward runs."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


def swap_sdpa_during_forward(module: nn.Module, kernel: Callable) -> list[RemovableHandle]:
    """Hooks that make ``F.scaled_dot_product_attention`` be ``kernel`` for the duration of ``module``'s forward.

    The function in place before the forward is put back after it, also when the forward raises, so that
    nested or consecutive modules see what they expect. Returns the two hook handles (remove both to undo).
    """
    saved: list[Callable] = []

    def enter(module: nn.Module, args: tuple) -> None:
        saved.append(F.scaled_dot_product_attention)
        F.scaled_dot_product_attention = kernel

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        if saved:  # empty when an earlier pre-hook raised before ``enter`` ran
            F.scaled_dot_product_attention = saved.pop()

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


def remove_handles(handles: list[RemovableHandle]) -> None:
    """Remove every hook in ``handles`` and empty the list (so a second call does nothing)."""
    for handle in handles:
        handle.remove()
    handles.clear()
