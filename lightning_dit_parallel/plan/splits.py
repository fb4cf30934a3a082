"""Applying a plan's splits to one value and to named forward arguments.

Sequence parallelism cuts a token sequence over ranks and PipeFusion cuts it into patches; both read the plan's
``Split``s the same way and differ only in the function that cuts one tensor, which they pass in. A ``Concat``
(several sequences along one dim) is cut part by part with the same function; its parts' lengths come from the
caller (the sequences cut so far in this forward).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_dit_parallel.plan import Concat, Each, PrefixCount, Split, SplitSpec

#: cut(tensor, split, where) -> the part of ``tensor`` along ``split.dim`` that this rank or pass keeps.
CutFn = Callable[[Tensor, Split, str], Tensor]

#: length(sequence) -> the whole length of a sequence cut earlier in this forward, or ``None`` if it was not.
LengthFn = Callable[[str], "int | None"]


def as_tensor(x: Any, where: str) -> Tensor:
    """``x`` itself when it is a tensor; a ``TypeError`` naming ``where`` otherwise."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: the plan cuts or gathers this value, but it is a {type(x).__name__}, not a Tensor.")
    return x


def cut_value(value: Any, spec: SplitSpec, cut: CutFn, where: str, length: LengthFn | None = None) -> Any:
    """``cut`` a tensor with a ``Split`` or a ``Concat``, an integer with a ``PrefixCount``, every tensor of a list
    with ``Each``, or a tuple (list) of tensors element-wise with a tuple of splits, where ``None`` leaves an element
    alone. ``length`` gives the
    lengths a ``Concat`` and a ``PrefixCount`` need.

    Raises:
        TypeError: for a value that is not a tensor, or not a tuple of the spec's length.
    """
    if isinstance(spec, Split):
        x = as_tensor(value, where)
        if spec.ndim is not None and x.dim() != spec.ndim:
            return x
        return cut_folded(x, spec, cut, length, where) if spec.folded else cut(x, spec, where)
    if isinstance(spec, Concat):
        return cut_concat(as_tensor(value, where), spec, cut, length, where)
    if isinstance(spec, PrefixCount):
        return cut_prefix_count(value, spec, cut, length, where)
    if isinstance(spec, Each):
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{where}: the plan cuts every element of a list, got a {type(value).__name__}.")
        # k x (..., S, ...) -> k x (..., cut(S), ...)
        return type(value)(
            x if x is None else cut_value(x, spec.split, cut, f"{where}[{i}]", length) for i, x in enumerate(value)
        )
    if not isinstance(value, (tuple, list)) or len(value) != len(spec):
        got = f"{type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list)) else type(value).__name__
        raise TypeError(f"{where}: the plan splits a {len(spec)}-tuple, got {got}.")
    return type(value)(x if s is None else cut_value(x, s, cut, where, length) for x, s in zip(value, spec))


def cut_folded(x: Tensor, split: Split, cut: CutFn, length: LengthFn | None, where: str) -> Tensor:
    """Cut a dim holding ``G`` groups of a sequence's ``S`` tokens, tokens inner, group by group.

    (..., G*S, ...) -> (..., G, S, ...) -> cut -> (..., G, cut(S), ...) -> (..., G*cut(S), ...).

    Raises:
        NotImplementedError: when the caller cannot say the sequence's length (``length`` is ``None``).
        RuntimeError: for a sequence not cut earlier in this forward.
        ValueError: when the dim is not a whole number of groups.
    """
    if length is None:
        raise NotImplementedError(f"{where}: this parallelizer does not cut folded splits ({split}).")
    tokens = length(split.sequence)
    if tokens is None:
        raise RuntimeError(
            f"{where}: the plan cuts a folded {split.sequence!r}, which was not cut earlier in this forward, so its"
            " length (and the number of groups) is unknown; cut it at an earlier split point of the plan."
        )
    dim = split.dim % x.dim()
    if x.shape[dim] % tokens:
        raise ValueError(
            f"{where}: dim {split.dim} of shape {tuple(x.shape)} should hold groups of the {tokens} tokens of"
            f" {split.sequence!r}."
        )
    grouped = x.unflatten(dim, (x.shape[dim] // tokens, tokens))  # (..., G*S, ...) -> (..., G, S, ...)
    local = cut(grouped, Split(split.sequence, dim + 1), where)  # (..., G, S, ...) -> (..., G, cut(S), ...)
    return local.flatten(dim, dim + 1)  # (..., G, cut(S), ...) -> (..., G*cut(S), ...)


def cut_concat(x: Tensor, concat: Concat, cut: CutFn, length: LengthFn | None, where: str) -> Tensor:
    """Cut each named part of ``x`` like its sequence and concatenate the parts again, in order.

    (..., L_1 + ... + L_k, ...) -> (..., cut(L_1) + ... + cut(L_k), ...); a ``None`` part keeps its tokens.

    Raises:
        NotImplementedError: when the caller cannot say the sequences' lengths (``length`` is ``None``).
        RuntimeError: for a named sequence not cut earlier in this forward.
        ValueError: when the parts' lengths do not add up to the tensor's dim.
    """
    if length is None:
        raise NotImplementedError(f"{where}: this parallelizer does not cut Concat splits ({concat}).")
    dim = concat.dim % x.dim()
    lengths = {name: length(name) for name in concat.sequences if name is not None}
    unknown = [name for name, n in lengths.items() if n is None]
    if unknown:
        raise RuntimeError(
            f"{where}: the plan cuts a concatenation of {concat.sequences}, but {unknown} were not cut earlier in"
            " this forward, so their lengths are unknown; cut them at an earlier split point of the plan."
        )
    named = sum(lengths.values())
    rest = x.shape[dim] - named
    if rest < 0 or (rest and None not in concat.sequences):
        raise ValueError(
            f"{where}: dim {concat.dim} of shape {tuple(x.shape)} should hold {concat.sequences} with lengths"
            f" {lengths}{' and the rest' if None in concat.sequences else ''}, which make {named} tokens."
        )
    sizes = [rest if name is None else lengths[name] for name in concat.sequences]
    parts = x.split(sizes, dim=dim)  # (..., L_1 + ... + L_k, ...) -> k x (..., L_i, ...)
    cut_parts = [
        part if name is None else cut(part, Split(name, concat.dim), where)
        for part, name in zip(parts, concat.sequences)
    ]
    return torch.cat(cut_parts, dim=dim)  # k x (..., cut(L_i), ...) -> (..., sum of cut(L_i), ...)


def cut_prefix_count(count: Any, spec: PrefixCount, cut: CutFn, length: LengthFn | None, where: str) -> int:
    """How many of the first ``count`` tokens of a sequence this rank's (or pass's) part holds.

    A part is a run of the sequence, so they are the leading tokens of the part: a mask of the counted tokens is cut
    like the sequence and summed, (S,) -> (local,) -> int (padding is cut as False).

    Raises:
        NotImplementedError: when the caller cannot say the sequence's length (``length`` is ``None``).
        RuntimeError: for a sequence not cut earlier in this forward.
        TypeError: for a count that is not an integer.
        ValueError: for a count outside ``[0, S]``.
    """
    if length is None:
        raise NotImplementedError(f"{where}: this parallelizer does not cut token counts ({spec}).")
    if isinstance(count, Tensor) and count.dim() == 0 and not count.is_floating_point():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{where}: the plan cuts a count of {spec.sequence!r} tokens, got a {type(count).__name__}.")
    tokens = length(spec.sequence)
    if tokens is None:
        raise RuntimeError(
            f"{where}: the plan cuts a count of {spec.sequence!r} tokens, which were not cut earlier in this forward,"
            " so their length is unknown; cut them at an earlier split point of the plan."
        )
    if not 0 <= count <= tokens:
        raise ValueError(f"{where}: a count of {count} leading tokens of {spec.sequence!r}, which has {tokens}.")
    counted = torch.arange(tokens) < count  # (S,): True for the counted tokens
    return int(cut(counted, Split(spec.sequence, 0), where).sum())  # (S,) -> (local,) -> how many are here


def cut_arguments(
    signature: inspect.Signature,
    specs: Mapping[str, SplitSpec],
    args: tuple,
    kwargs: dict,
    cut: CutFn,
    where: str,
    length: LengthFn | None = None,
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
            bound.arguments[name] = cut_value(value, spec, cut, f"{where}({name}=...)", length)
    return bound.args, bound.kwargs
