"""Finding what the package knows about a class: the plan of a DiT class and the cut of a VAE class.

Both come from one ``ClassRegistry``: entries registered at run time (``register_plan`` / ``register_vae_cut``), then
a class attribute (``dit_plan`` / ``vae_cut``), then the facts the family files ship for diffusers classes
(``families/``, by class name), walking the class's MRO so that a subclass inherits its parent's entry. DiT plans
have a last source: diffusers' own ``_cp_plan``, translated (``plan/cp_plan.py``). This module sits above
``plan/`` (the data types) and ``families/`` (the data), so those never import each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from torch import nn

from lightning_dit_parallel.families import builtin_plans, builtin_vae_cuts, is_diffusers_class, unsupported_reason
from lightning_dit_parallel.plan import DiTPlan, VaeCut, is_within
from lightning_dit_parallel.plan.cp_plan import has_cp_plan, translate_cp_plan
from lightning_dit_parallel.plan.optional import without_absent

T = TypeVar("T")


class ClassRegistry(Generic[T]):
    """Values of type ``kind`` found by class: registered, then the class attribute ``attribute``, then the
    ``builtin`` table of diffusers class names; each class of the MRO in turn.

    Args:
        kind: the type of the values (checked at registration and on class attributes).
        attribute: the class attribute that declares a value in the class itself.
        builtin: returns the shipped table (diffusers class name -> value), called on first lookup.
        what: the registering function's name, for error messages.
    """

    def __init__(self, kind: type[T], attribute: str, builtin: Callable[[], Mapping[str, T]], what: str) -> None:
        self.kind, self.attribute, self.builtin, self.what = kind, attribute, builtin, what
        self._registered: dict[type, T] = {}

    def register(self, cls: type[nn.Module], value: T) -> None:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{self.what} expects an nn.Module subclass, got {cls!r}.")
        if not isinstance(value, self.kind):
            raise TypeError(f"{self.what} expects a {self.kind.__name__}, got {type(value).__name__}.")
        self._registered[cls] = value

    def unregister(self, cls: type[nn.Module]) -> None:
        self._registered.pop(cls, None)

    def own(self, klass: type) -> T | None:
        """The value declared for ``klass`` itself (not its bases), or ``None``."""
        value = self._registered.get(klass)
        if value is not None:
            return value
        attr = klass.__dict__.get(self.attribute)
        if isinstance(attr, self.kind):
            return attr
        return self.builtin().get(klass.__name__) if is_diffusers_class(klass) else None

    def lookup(self, cls: type) -> T | None:
        """The value of the first class of ``cls``'s MRO that declares one, or ``None``."""
        for klass in cls.__mro__:
            value = self.own(klass)
            if value is not None:
                return value
        return None


PLANS: ClassRegistry[DiTPlan] = ClassRegistry(DiTPlan, "dit_plan", builtin_plans, "register_plan")
VAE_CUTS: ClassRegistry[VaeCut] = ClassRegistry(VaeCut, "vae_cut", builtin_vae_cuts, "register_vae_cut")


def register_plan(cls: type[nn.Module], plan: DiTPlan) -> None:
    """Declare the plan of a DiT class (and of its subclasses, unless they have their own).

    Example:
        >>> register_plan(MyDiT, DiTPlan(split_outputs={"x_embedder": Split("image", 1)}, ...))  # doctest: +SKIP
    """
    PLANS.register(cls, plan)


def unregister_plan(cls: type[nn.Module]) -> None:
    """Remove a plan declared with ``register_plan`` (no-op if none)."""
    PLANS.unregister(cls)


def register_vae_cut(cls: type[nn.Module], cut: VaeCut) -> None:
    """Declare how a VAE class (and its subclasses, unless they have their own) is cut for a parallel decode."""
    VAE_CUTS.register(cls, cut)


def unregister_vae_cut(cls: type[nn.Module]) -> None:
    """Remove a cut declared with ``register_vae_cut`` (no-op if none)."""
    VAE_CUTS.unregister(cls)


def vae_cut_for(module: nn.Module | type) -> VaeCut | None:
    """The cut of a VAE module or class: registered cuts, a ``vae_cut`` class attribute, then the shipped cuts of
    diffusers classes (by class name); ``None`` when there is none."""
    return VAE_CUTS.lookup(module if isinstance(module, type) else type(module))


def plan_for(module: nn.Module | type) -> DiTPlan | None:
    """The plan for a module or class: registered plans, then a ``dit_plan`` class attribute, then the plans
    that ship for diffusers families (for a module, bound to it: see ``DiTPlan.optional_modules``), then (for a
    module, not a class) the translation of diffusers' own
    ``_cp_plan`` of its class (``cp_plan.py``, which reads the rest from the module) unless the class is known to
    have no exact plan; ``None`` when there is none.

    Raises:
        ValueError: for a ``_cp_plan`` that cannot be translated into an exact plan (the message says why).
    """
    cls = module if isinstance(module, type) else type(module)
    plan = PLANS.lookup(cls)
    if plan is not None:
        # a module gets the plan of its config: entries of optional modules it lacks dropped (plan/optional.py)
        return plan if isinstance(module, type) else without_absent(plan, module)
    if not isinstance(module, type) and has_cp_plan(module) and unsupported_reason(cls) is None:
        return translate_cp_plan(module)
    return None


HOW_TO_DECLARE = (
    "Declare a plan for your DiT class with `lightning_dit_parallel.register_plan(MyDiT, DiTPlan(...))` or a"
    " `dit_plan = DiTPlan(...)` class attribute (see the README section 'Bring your own DiT'), then check it"
    " against one process with `lightning_dit_parallel.check_plan(model, inputs)` or"
    " `ldp-check-plan MODULE:FACTORY`."
)


def find_planned_modules(root: nn.Module) -> list[tuple[str, nn.Module, DiTPlan]]:
    """Every outermost submodule of ``root`` (``root`` included) whose class has a plan.

    Raises:
        ValueError: when there is none (the message says how to declare a plan), or when a submodule outside them
            is a diffusers class known to have no exact plan (the message gives the reason).
    """
    found: list[tuple[str, nn.Module, DiTPlan]] = []
    claimed: list[str] = []
    for path, module in root.named_modules():
        if any(is_within(path, c) for c in claimed):
            continue
        plan = plan_for(module)
        if plan is not None:
            found.append((path, module, plan))
            claimed.append(path)
            continue
        reason = unsupported_reason(type(module))
        if reason is not None:
            raise ValueError(
                f"{type(module).__name__} ({path or 'the module'}) cannot be parallelized exactly: {reason} Run it"
                " with data parallelism only (every model-parallel degree 1)."
            )
    if not found:
        classes = sorted({type(m).__name__ for _, m in root.named_children()}) or [type(root).__name__]
        raise ValueError(
            f"No submodule of {type(root).__name__} has a parallel plan (children: {classes}). {HOW_TO_DECLARE}"
        )
    return found
