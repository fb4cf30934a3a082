"""What TeaCache-style caching decides from: the timestep-modulated input of the first block, found from the plan.

TeaCache compares, from one step to the next, the first block's input after its normalization and the timestep's
shift and scale (FLUX.1: ``transformer_blocks[0].norm1(hidden_states, emb=temb)[0]``), which tracks how much the
model's output will change better than the raw input does. Every DiT block computes that tensor right before its
first attention and passes it to it as the first tensor argument: in AdaLN-zero blocks the norm returns it (diffusers'
``AdaLayerNormZero``: Flux, SD3, CogVideoX, DiT), in others the block modulates the norm's output itself (Wan, PixArt:
``norm1(x) * (1 + scale) + shift``). So the modulated input is read, with no per-family knowledge, as the first
floating-point tensor argument of the first attention module called inside the first block, the attention modules
being the plan's (``self_attention``, ``linear_attention``, ``replicated_tail_attention``). For joint-attention
blocks that is the image stream's (Flux, SD3: ``attn(hidden_states=norm_hidden_states, encoder_hidden_states=...)``),
as in TeaCache.

The decision is taken there, inside the first block: a skipped step has computed only the first block's
normalization and modulation (as TeaCache does before it skips every block); the first block's forward is then
abandoned (``SkipFirstBlock``, caught by the cache's block forward, which returns the block's skipped output).

Fallback: a first block with none of the plan's attention modules decides, before it runs, from its own floating-point
arguments (the mean relative change over those that change: hidden states and timestep embedding; a constant text
context or rotary angles do not dilute it). Logged once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_dit_parallel.parallel.cache.blocks import flatten_call
from lightning_dit_parallel.plan import DiTPlan


class SkipFirstBlock(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside the first block once the step is decided skipped: its forward stops there."""


def attention_modules(model: nn.Module, plan: DiTPlan, block_path: str) -> list[nn.Module]:
    """The plan's attention modules inside the block at ``block_path``, in module order."""
    patterns = [*plan.self_attention, *plan.linear_attention, *plan.replicated_tail_attention]
    return [
        module
        for path, module in model.named_modules()
        if path.startswith(block_path + ".") and any(fnmatch.fnmatchcase(path, p) for p in patterns)
    ]


def modulated_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The first floating-point tensor argument of an attention call (positional first, then keyword in call order)."""
    leaves, _ = flatten_call(args, kwargs)
    return next((x for x in leaves if isinstance(x, Tensor) and x.is_floating_point()), None)


def rescaled(distance: float, coefficients: Sequence[float] | None) -> float:
    """TeaCache's rescaling of a step's relative distance: the polynomial with ``coefficients`` (highest degree first,
    as ``numpy.poly1d``) at ``distance``; the distance itself without coefficients."""
    if not coefficients:
        return distance
    value = 0.0
    for c in coefficients:  # Horner
        value = value * distance + c
    return value
