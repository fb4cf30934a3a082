"""Plans that ship for diffusers transformer families, found by class name.

Every module in this package is one family and defines ``PLANS``: a mapping from diffusers class names to
their ``DiTPlan``. Adding a family is adding one file. A family module may also define ``UNSUPPORTED``: diffusers
class names mapped to why no exact plan exists for them; parallelizing such a model fails with that reason. Plan modules
import only ``lightning_dit_parallel.plan`` (plans are data), so the index is built by importing them all once, on first
use, without importing any diffusers model.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping

from lightning_dit_parallel.plan import DiTPlan


@functools.cache
def builtin_plans() -> Mapping[str, DiTPlan]:
    """diffusers class name -> shipped plan, over every family module of this package."""
    index: dict[str, DiTPlan] = {}
    owner: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        plans = getattr(module, "PLANS", None)
        if not isinstance(plans, Mapping):
            raise TypeError(f"{module.__name__} must define PLANS, a mapping of diffusers class names to DiTPlans.")
        for class_name, plan in plans.items():
            if class_name in index:
                raise ValueError(f"{class_name} has plans in both {owner[class_name]} and {module.__name__}.")
            if not isinstance(plan, DiTPlan):
                raise TypeError(f"{module.__name__}.PLANS[{class_name!r}] is a {type(plan).__name__}, not a DiTPlan.")
            index[class_name] = plan
            owner[class_name] = module.__name__
    return index


def builtin_plan(cls: type) -> DiTPlan | None:
    """The plan shipped for a diffusers class, or ``None``."""
    if not cls.__module__.startswith("diffusers."):
        return None
    return builtin_plans().get(cls.__name__)


@functools.cache
def builtin_unsupported() -> Mapping[str, str]:
    """diffusers class name -> why no exact plan exists, over every family module that declares ``UNSUPPORTED``."""
    index: dict[str, str] = {}
    plans = builtin_plans()
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for class_name, reason in getattr(module, "UNSUPPORTED", {}).items():
            if class_name in plans or class_name in index:
                raise ValueError(
                    f"{module.__name__} lists {class_name} as unsupported, but it has a plan or is listed twice."
                )
            if not isinstance(reason, str) or not reason:
                raise TypeError(f"{module.__name__}.UNSUPPORTED[{class_name!r}] must be a non-empty reason string.")
            index[class_name] = reason
    return index


def unsupported_reason(cls: type) -> str | None:
    """Why the diffusers class ``cls`` has no shipped plan (it cannot be parallelized exactly), or ``None``."""
    if not cls.__module__.startswith("diffusers."):
        return None
    return builtin_unsupported().get(cls.__name__)
