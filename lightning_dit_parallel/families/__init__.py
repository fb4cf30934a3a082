"""One file per diffusers family, holding every fact the package needs about it.

A family module may define, each a mapping keyed by diffusers class name:

- ``PLANS``: DiT class -> its ``DiTPlan``;
- ``UNSUPPORTED``: DiT class -> why no exact plan exists (parallelizing such a model fails with that reason);
- ``VAE_CUTS``: VAE class -> its ``VaeCut`` for the parallel decode;
- ``LATENTS``: DiT class -> the ``LatentFormat`` of the family's VAE (the planner's token count without a VAE config).

Adding a family is adding one file. Family modules import only ``lightning_dit_parallel.plan`` (facts are data), so
the indexes are built by importing them all once, on first use, without importing any diffusers model. Where the
facts are looked up by class (registered at run time, class attributes, then these files): ``registry.py``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType, ModuleType

from lightning_dit_parallel.plan import DiTPlan, LatentFormat, VaeCut

#: what a family module may define -> the type of its values
FACTS: Mapping[str, type] = MappingProxyType(
    {"PLANS": DiTPlan, "UNSUPPORTED": str, "VAE_CUTS": VaeCut, "LATENTS": LatentFormat}
)


@functools.cache
def family_modules() -> tuple[ModuleType, ...]:
    """Every family module of this package, imported, in name order."""
    return tuple(
        importlib.import_module(f"{__name__}.{info.name}")
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
    )


@functools.cache
def facts(kind: str) -> Mapping[str, object]:
    """diffusers class name -> the fact of ``kind`` (a key of ``FACTS``), over every family module.

    Raises:
        TypeError: for a fact that is not a mapping, or a value of the wrong type.
        ValueError: for a class named by two family modules.
    """
    expected = FACTS[kind]
    index: dict[str, object] = {}
    owner: dict[str, str] = {}
    for module in family_modules():
        table = getattr(module, kind, {})
        if not isinstance(table, Mapping):
            raise TypeError(f"{module.__name__}.{kind} must be a mapping of diffusers class names.")
        for class_name, value in table.items():
            if class_name in index:
                raise ValueError(f"{class_name} is in {kind} of both {owner[class_name]} and {module.__name__}.")
            if not isinstance(value, expected) or (expected is str and not value):
                raise TypeError(f"{module.__name__}.{kind}[{class_name!r}] is not a {expected.__name__}: {value!r}.")
            index[class_name] = value
            owner[class_name] = module.__name__
    if kind == "UNSUPPORTED":
        both = sorted(set(index) & set(facts("PLANS")))
        if both:
            raise ValueError(f"{both} are listed as unsupported but have a plan.")
    return MappingProxyType(index)


def builtin_plans() -> Mapping[str, DiTPlan]:
    """diffusers class name -> shipped plan, over every family module."""
    return facts("PLANS")  # type: ignore[return-value]


def builtin_unsupported() -> Mapping[str, str]:
    """diffusers class name -> why no exact plan exists, over every family module."""
    return facts("UNSUPPORTED")  # type: ignore[return-value]


def builtin_vae_cuts() -> Mapping[str, VaeCut]:
    """diffusers VAE class name -> its shipped cut, over every family module."""
    return facts("VAE_CUTS")  # type: ignore[return-value]


def builtin_latents() -> Mapping[str, LatentFormat]:
    """diffusers DiT class name -> the latent format of its family's VAE, over every family module."""
    return facts("LATENTS")  # type: ignore[return-value]


def is_diffusers_class(cls: type) -> bool:
    """Whether ``cls`` is defined by diffusers (shipped facts are keyed by the class name of diffusers classes)."""
    return cls.__module__.startswith("diffusers.")


def builtin_plan(cls: type) -> DiTPlan | None:
    """The plan shipped for a diffusers class, or ``None``."""
    return builtin_plans().get(cls.__name__) if is_diffusers_class(cls) else None


def unsupported_reason(cls: type) -> str | None:
    """Why the diffusers class ``cls`` has no shipped plan (it cannot be parallelized exactly), or ``None``."""
    return builtin_unsupported().get(cls.__name__) if is_diffusers_class(cls) else None
