"""Which forward arguments of a DiT carry the batch, and cutting them along dim 0 (CFG parallel, micro-batches).

Decided by shapes: given the batch size (dim 0 of ``hidden_states`` in every diffusers DiT), every tensor
argument, nested in tuples, lists, dicts (``added_cond_kwargs``) and dataclasses too, whose dim 0 has that size
is cut along dim 0. Anything else (scalars, a ``(1,)`` timestep, a rotary table) goes whole. A plan input split
along dim 0 (a sequence without a batch dim, e.g. Flux's ``img_ids`` of shape (S, 3)) is never cut here, even
when its length happens to equal the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_dit_parallel.plan import Concat, Each, Split, SplitSpec


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists, dicts and dataclasses (diffusers outputs)."""
    if isinstance(value, Tensor):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        return dataclasses.replace(value, **{name: map_tensors(getattr(value, name), fn) for name in fields})
    if isinstance(value, dict):
        return type(value)((k, map_tensors(v, fn)) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        items = [map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def first_batch_size(arguments: dict[str, Any]) -> tuple[str, int] | None:
    """``(name, size of dim 0)`` of the first tensor argument with at least one dim, or ``None``."""
    for name, value in arguments.items():
        if isinstance(value, Tensor) and value.dim() >= 1:
            return name, value.shape[0]
    return None


def has_batch_dim(x: Tensor, batch: int, split: Split | Concat | None) -> bool:
    """Whether dim 0 of ``x`` is the batch: it has the batch size and the plan does not cut a sequence there."""
    if x.dim() == 0 or x.shape[0] != batch:
        return False
    if isinstance(split, Split) and split.ndim is not None and x.dim() != split.ndim:
        return True  # the plan cuts tensors of another rank only, e.g. a (B, S) timestep and not a (B,) one
    return split is None or split.dim % x.dim() != 0


def map_batch(value: Any, batch: int, spec: SplitSpec | None, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of one forward argument whose dim 0 is the batch; leave the others alone.

    ``spec`` is the plan's ``split_inputs`` entry for the argument (a Split, a tuple of them, or ``None``).
    """
    if isinstance(value, tuple) and isinstance(spec, tuple) and len(spec) == len(value):
        return type(value)(map_batch(v, batch, s, fn) for v, s in zip(value, spec))
    if isinstance(spec, Each):
        spec = spec.split  # every element of the list carries the same split
    split = spec if isinstance(spec, (Split, Concat)) else None
    return map_tensors(value, lambda x: fn(x) if has_batch_dim(x, batch, split) else x)


def split_argument(value: Any, batch: int, rank: int, size: int, spec: SplitSpec | None) -> Any:
    """This rank's part of one forward argument: (batch, ...) -> (batch/size, ...) for batch tensors."""
    local = batch // size
    return map_batch(value, batch, spec, lambda x: x.narrow(0, rank * local, local))  # (B, ...) -> (B/size, ...)
