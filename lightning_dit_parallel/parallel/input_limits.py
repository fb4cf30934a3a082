"""Forward arguments that a layout cannot parallelize exactly: an error at the call, not a wrong or broken result.

They come from the plan (``DiTPlan.sequence_unsupported_inputs``): arguments the plan's cuts do not cover, with the
reason, under sequence parallelism (Ulysses, Ring, DistriFusion) and PipeFusion. (Arguments read by the block's
position, ``block_indexed_inputs``, are taken under pipeline stages: a stage's loop counts its blocks from their
global position, see ``pipeline/positions.py``.)

A forward pre-hook on the DiT raises a ``ValueError`` when a call passes one of them (not ``None``). The arguments of
a model-parallel group are identical on its ranks (see ``guard.py``), so every rank raises together, before any
collective of the call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.utils.hooks import remove_handles


@dataclass
class InputLimits:
    """The refusing pre-hook on one DiT; ``remove()`` takes it off."""

    refused: dict[str, str]  # argument -> why this layout cannot take it
    handles: list[RemovableHandle] = field(default_factory=list)

    def remove(self) -> None:
        remove_handles(self.handles)


def refused_inputs(plan: DiTPlan, layout: ParallelLayout, patched: bool) -> dict[str, str]:
    """The arguments a call of the DiT may not pass under ``layout``, each with the reason. ``patched``: the tokens are
    cut (sequence parallelism, DistriFusion or PipeFusion)."""
    refused: dict[str, str] = {}
    if patched:
        refused.update(plan.sequence_unsupported_inputs)
    return refused


def apply_input_limits(model: nn.Module, refused: dict[str, str]) -> InputLimits:
    """Install the pre-hook that raises when a call of ``model`` passes one of ``refused`` (see ``refused_inputs``)."""
    names = list(inspect.signature(type(model).forward.__get__(model)).parameters)
    positions = {name: names.index(name) for name in refused if name in names}  # where a positional one would be
    limits = InputLimits(dict(refused))

    def passed(name: str, args: tuple, kwargs: dict) -> bool:
        position = positions.get(name, len(args))
        return (args[position] if position < len(args) else kwargs.get(name)) is not None

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = [name for name in limits.refused if passed(name, args, kwargs)]
        if given:
            reasons = "; ".join(f"{name!r}: {limits.refused[name]}" for name in given)
            raise ValueError(f"{type(model).__name__} cannot take these arguments in this layout: {reasons}.")

    limits.handles.append(model.register_forward_pre_hook(check, with_kwargs=True, prepend=True))
    return limits
