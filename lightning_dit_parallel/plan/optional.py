"""A plan bound to one model: the entries of module paths that this model's config leaves out are dropped.

A plan holds for every config its class accepts. Some configs build fewer modules (Cosmos-Predict2 has no
``learnable_pos_embed``, ``extra_pos_embed_type=None``; a Sana without cross-attention has no ``attn2``); the plan
lists such paths in ``DiTPlan.optional_modules``. For a model that lacks one, every plan entry keyed by that path, or
by a path or pattern inside it, is dropped: the model simply has nothing to cut there. Paths not listed stay
required, so a wrong path in a plan still fails loudly (``Plan module paths ... do not exist``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping

from torch import nn

from lightning_dit_parallel.plan import DiTPlan, module_paths

#: the plan's fields keyed by module path or pattern (mappings) or holding them (tuples)
_MAPPING_FIELDS = (
    "split_module_inputs",
    "split_outputs",
    "gather_outputs",
    "self_attention",
    "linear_attention",
    "token_grids",
    "split_module_inputs_each_call",
    "gather_module_inputs",
    "replicated_tail_attention",
    "tensor_parallel",
    "tensor_parallel_outputs",
    "tensor_parallel_unsupported",
)
_TUPLE_FIELDS = ("cross_attention", "shared_modules")


def absent_optional_modules(plan: DiTPlan, model: nn.Module) -> list[str]:
    """The plan's ``optional_modules`` that match no module of ``model``."""
    if not plan.optional_modules:
        return []
    modules = dict(model.named_modules())
    return [path for path in plan.optional_modules if not module_paths(modules, path)]


def without_absent(plan: DiTPlan, model: nn.Module) -> DiTPlan:
    """``plan`` without the entries under the optional modules that ``model`` lacks (``plan`` itself if none).

    Raises:
        ValueError: when what remains is not a plan (e.g. its only gather point was optional).
    """
    absent = absent_optional_modules(plan, model)
    if not absent:
        return plan
    changes: dict[str, object] = {}
    for name in _MAPPING_FIELDS:
        value: Mapping = getattr(plan, name, None) or {}
        kept = {key: entry for key, entry in value.items() if not _under(key, absent)}
        if len(kept) != len(value):
            changes[name] = kept
    for name in _TUPLE_FIELDS:
        value = getattr(plan, name)
        kept = tuple(key for key in value if not _under(key, absent))
        if len(kept) != len(value):
            changes[name] = kept
    try:
        return dataclasses.replace(plan, **changes)
    except ValueError as err:
        raise ValueError(
            f"The plan of {type(model).__name__} without its optional modules {absent} (absent in this config) is"
            f" not a plan: {err}"
        ) from err


def _under(key: str, absent: list[str]) -> bool:
    """Whether the plan key (a path or pattern) names an absent optional module or something inside it."""
    return any(
        key == path
        or key.startswith(path + ".")
        or fnmatch.fnmatchcase(key, path)
        or fnmatch.fnmatchcase(key, path + ".*")
        for path in absent
    )


__all__ = ["absent_optional_modules", "without_absent"]
