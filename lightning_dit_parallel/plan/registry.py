"""Finding the plan of a DiT class: plans registered at run time, ``dit_plan`` class attributes, and the plans
that ship for diffusers families (``families/``).

``dit_plan.py`` holds the plan's data types only; this module is the one place that knows where plans come from,
so ``dit_plan.py`` and ``families/`` never import each other in a circle.
"""

from __future__ import annotations

from torch import nn

from lightning_dit_parallel.families import builtin_plan, unsupported_reason
from lightning_dit_parallel.plan import DiTPlan, is_within
from lightning_dit_parallel.plan.cp_plan import has_cp_plan, translate_cp_plan
from lightning_dit_parallel.plan.optional import without_absent

_REGISTRY: dict[type, DiTPlan] = {}


def register_plan(cls: type[nn.Module], plan: DiTPlan) -> None:
    """Declare the plan of a DiT class (and of its subclasses, unless they have their own).

    Example:
        >>> register_plan(MyDiT, DiTPlan(split_outputs={"x_embedder": Split("image", 1)}, ...))  # doctest: +SKIP
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_plan expects an nn.Module subclass, got {cls!r}.")
    if not isinstance(plan, DiTPlan):
        raise TypeError(f"register_plan expects a DiTPlan, got {type(plan).__name__}.")
    _REGISTRY[cls] = plan


def unregister_plan(cls: type[nn.Module]) -> None:
    """Remove a plan declared with ``register_plan`` (no-op if none)."""
    _REGISTRY.pop(cls, None)


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
    for klass in cls.__mro__:
        plan = _REGISTRY.get(klass)
        if plan is None:
            attr = klass.__dict__.get("dit_plan")
            plan = attr if isinstance(attr, DiTPlan) else builtin_plan(klass)
        if plan is not None:
            # a module gets the plan of its config: entries of optional modules it lacks dropped (plan_optional.py)
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
