"""Applying a plan's splits to one value and to named forward arguments.

Sequence parallelism cuts a token sequence over ranks and PipeFusion cuts it into patches; both read the plan's
``Split``s the same way and differ only in the function that cuts one tensor, which they pass in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from lightning_dit_parallel.plan import Split, SplitSpec

#: cut(tensor, split, where) -> the part of ``tensor`` along ``split.dim`` that this rank or pass keeps.
CutFn = Callable[[Tensor, Split, str], Tensor]


def as_tensor(x: Any, where: str) -> Tensor:
    """``x`` itself when it is a tensor; a ``TypeError`` naming ``where`` otherwise."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: the plan cuts or gathers this value, but it is a {type(x).__name__}, not a Tensor.")
    return x


def cut_value(value: Any, spec: SplitSpec, cut: CutFn, where: str) -> Any:
    """``cut`` a tensor with a ``Split``, or a tuple (list) of tensors element-wise with a tuple of splits, where
    ``None`` leaves an element alone.

    Raises:
        TypeError: for a value that is not a tensor, or not a tuple of the spec's length.
    """
    if isinstance(spec, Split):
        return cut(as_tensor(value, where), spec, where)
    if not isinstance(value, (tuple, list)) or len(value) != len(spec):
        got = f"{type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list)) else type(value).__name__
        raise TypeError(f"{where}: the plan splits a {len(spec)}-tuple, got {got}.")
    return type(value)(x if s is None else cut(as_tensor(x, where), s, where) for x, s in zip(value, spec))


def cut_arguments(
    signature: inspect.Signature, specs: Mapping[str, SplitSpec], args: tuple, kwargs: dict, cut: CutFn, where: str
) -> tuple[tuple, dict]:
    """Cut the forward arguments named in ``specs``; arguments that are ``None`` or absent are left alone.

    Returns ``(args, kwargs)`` for the forward, bound through ``signature``.
    """
    if not specs:
        return args, kwargs
    bound = signature.bind(*args, **kwargs)
    for name, spec in specs.items():
        value = bound.arguments.get(name)
        if value is not None:
            bound.arguments[name] = cut_value(value, spec, cut, f"{where}({name}=...)")
    return bound.args, bound.kwargs
