"""The strategy's grouped options: ``AutoOptions`` (what ``auto`` is told), the keyword aliases that fill
``PipelineOptions`` and ``AutoOptions`` field by field (the flat names of earlier versions), and ``check_options``,
the one cross-check of the options against the requested layout.

``DiTParallelStrategy(pp_degree=2, pipeline=PipelineOptions("pipefusion", num_patches=4))`` and
``DiTParallelStrategy(pp_degree=2, pp_mode="pipefusion", num_patches=4)`` are the same strategy; giving a field both
ways with different values is a ``TypeError``. Each option object validates its own fields (``__post_init__``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightning_dit_parallel.parallel.composition import check_composition
from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions

#: ``plan_options`` keys and where they go (the planner's ``Work`` and ``Hardware``).
WORK_OPTIONS = ("text_tokens", "batch", "samples", "cfg", "cfg_calls", "steps", "sequences")
HARDWARE_OPTIONS = ("flops", "bandwidth", "inter_node_bandwidth", "reserve")

#: Keyword aliases of ``PipelineOptions`` fields: strategy keyword -> field.
PIPELINE_ALIASES: dict[str, str] = {
    "pp_mode": "mode",
    "num_patches": "num_patches",
    "warmup_steps": "warmup_steps",
    "layers_per_stage": "layers_per_stage",
    "num_microbatches": "num_microbatches",
    "text_tokens": "text_tokens",
}

#: Keyword aliases of ``AutoOptions`` fields (the same names).
AUTO_ALIASES: dict[str, str] = {
    name: name for name in ("allow_approximate", "tokens", "height", "width", "frames", "memory", "plan_options")
}

T = TypeVar("T")


@dataclass(frozen=True)
class AutoOptions:
    """What ``auto`` (the layout planner choosing the layout at launch) is told about the work and the devices.

    Args:
        tokens: latent tokens per sample.
        height, width, frames: output size (instead of ``tokens``).
        memory: memory per device (``"24GiB"``; default: the device's).
        allow_approximate: PipeFusion may be chosen.
        plan_options: further planner inputs: ``text_tokens``, ``batch``, ``samples``, ``cfg``, ``cfg_calls``,
            ``steps``, ``sequences`` (the work) and ``flops``, ``bandwidth``, ``inter_node_bandwidth``, ``reserve``
            (the devices).

    Raises:
        ValueError: for ``plan_options`` keys that are not planner inputs, or a size that is not a positive integer.
    """

    tokens: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    memory: str | int | None = None
    allow_approximate: bool = False
    plan_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan_options", dict(self.plan_options or {}))
        unknown = sorted(set(self.plan_options) - set(WORK_OPTIONS) - set(HARDWARE_OPTIONS))
        if unknown:
            raise ValueError(
                f"plan_options {unknown} are not planner inputs; known: {sorted(WORK_OPTIONS + HARDWARE_OPTIONS)}."
            )
        sizes = {k: getattr(self, k) for k in ("tokens", "height", "width", "frames")}
        bad = {
            k: v for k, v in sizes.items() if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1)
        }
        if bad:
            raise ValueError(f"auto sizes must be positive integers or None; got {bad}.")
        if not isinstance(self.allow_approximate, bool):
            raise ValueError(f"allow_approximate must be a bool; got {self.allow_approximate!r}.")


def with_aliases(
    options: T | None, cls: type[T], aliases: Mapping[str, Any], names: Mapping[str, str], argument: str
) -> T:
    """``options`` (or ``cls()``) with the fields that keyword ``aliases`` give (``names``: keyword -> field).

    An alias counts as given when it is not ``None`` and differs from the field's default.

    Raises:
        TypeError: ``options`` is not a ``cls``, or an alias and ``options`` both set the same field to different
            values.
    """
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"{argument} must be a {cls.__name__} or None; got {options!r}.")
    base = options if options is not None else cls()
    defaults = cls()
    fields: dict[str, Any] = {}
    for keyword, value in aliases.items():
        name = names[keyword]
        default = getattr(defaults, name)
        if value is None or _same(value, default):
            continue
        current = getattr(base, name)
        if not _same(current, default) and not _same(current, value):
            raise TypeError(
                f"{keyword}={value!r} and {argument}.{name}={current!r} both set the {name} of {cls.__name__}; give it"
                f" once (the keyword {keyword} is an alias of {argument}={cls.__name__}({name}=...))."
            )
        fields[name] = value
    return dataclasses.replace(base, **fields) if fields else base


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def split_aliases(owner: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline and auto aliases among ``kwargs``; any other keyword is a ``TypeError`` naming ``owner``."""
    unknown = sorted(set(kwargs) - set(PIPELINE_ALIASES) - set(AUTO_ALIASES))
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments {unknown}.")
    pipeline = {k: v for k, v in kwargs.items() if k in PIPELINE_ALIASES}
    auto = {k: v for k, v in kwargs.items() if k in AUTO_ALIASES}
    return pipeline, auto


def auto_options(auto: bool | AutoOptions | None, aliases: Mapping[str, Any]) -> AutoOptions | None:
    """``auto`` as an ``AutoOptions`` with the aliases filled in (``None`` without auto).

    Raises:
        ValueError: for aliases of ``AutoOptions`` without ``auto`` (they would be ignored).
        TypeError: as ``with_aliases``, or for an ``auto`` that is neither a bool nor an ``AutoOptions``.
    """
    if auto is None or auto is False:
        given = sorted(k for k, v in aliases.items() if v is not None and not _same(v, getattr(AutoOptions(), k)))
        if given:
            raise ValueError(f"{given} are options of auto=True (the layout planner); got them without it.")
        return None
    if auto is True:
        auto = None
    return with_aliases(auto, AutoOptions, aliases, AUTO_ALIASES, "auto")


def check_options(
    layout: ParallelLayout,
    *,
    pipeline: PipelineOptions,
    distrifusion: DistriFusionOptions | None,
    auto: AutoOptions | None,
    parallel_vae: bool,
    cache: str | None,
    shard_modules: tuple[str, ...] | None,
    ulysses_overlap: object = "auto",
) -> None:
    """The one cross-check of the strategy's options against the requested layout (pure, at construction).

    With ``auto`` the planner chooses the degrees, FSDP, the pipeline schedule and the parallel VAE, so they must be
    left at their defaults; without it the layout and the options must compose (``composition_problems``; checked
    again on the resolved layout in ``setup_environment``).

    Raises:
        ValueError: naming the values.
    """
    if auto is not None:
        if (
            any(v != 1 for v in layout.degrees().values())
            or layout.fsdp
            or pipeline != PipelineOptions()
            or parallel_vae
            or distrifusion is not None
        ):
            raise ValueError(
                "auto=True chooses the degrees, FSDP, the pipeline schedule and the parallel VAE; leave them at their"
                f" defaults (got {layout.describe()}, {pipeline.describe()}, parallel_vae={parallel_vae}"
                f"{', distrifusion' if distrifusion is not None else ''})."
            )
        check_composition(layout, cache=cache)
        return
    check_composition(
        layout,
        pipeline=pipeline,
        distrifusion=distrifusion is not None,
        cache=cache,
        shard_modules=shard_modules,
        ulysses_overlap=ulysses_overlap,
    )
