"""Step caching options: which method, its threshold and its schedule (validated data, no torch).

Two methods skip the transformer blocks of a denoising step and add instead what they added at the last step that
ran them (their residual):

* ``"fbcache"`` (First-Block Cache): the first block(s) always run; when the relative change of their output
  residual since the last fully computed step, ``mean|r_t - r_prev| / mean|r_prev|``, is under the threshold, the
  remaining blocks are skipped.
* ``"teacache"`` (TeaCache-style): the relative L1 change of the first block's timestep-modulated input (the input of
  its first attention, ``teacache.py``) since the previous step, optionally rescaled by a polynomial
  (``CacheOptions.rescale``), is accumulated; while the sum stays under the threshold the whole block stack is
  skipped; it is reset to 0 whenever the blocks run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

CacheMethod = Literal["fbcache", "teacache"]

CACHE_METHODS: tuple[str, ...] = ("fbcache", "teacache")

#: The default threshold of each method, chosen from measurements to keep the sample close to the uncached one while
#: skipping enough steps to pay. fbcache: 0.2, measured on the embedded digits DiT (``ldp-predict``, 200 samples, 25
#: DDIM steps, 2 ranks, idle 2-core machine): it skips 17 of 25 steps at a class accuracy of 0.995 (uncached 1.000),
#: and the prediction loop ran 1.55-1.57x faster than uncached with Ulysses 2 and 1.56-1.66x with FSDP x Ulysses 2;
#: 0.15 skipped 15 steps (1.46-1.50x and 1.38-1.44x), 0.25 19 steps (1.75x, 1.67x; class accuracy 0.990). Published
#: values: ParaAttention recommends 0.08 for FLUX.1-dev, diffusers' FirstBlockCacheConfig uses 0.05 (more
#: conservative: give a lower ``cache_threshold`` for a model whose quality drops).
#: teacache: 0.1, lower than the TeaCache authors' 0.1-0.6 for rescaled distances because the distance here is the raw
#: one by default (``CacheOptions.rescale`` takes a per-model polynomial); measured on the same digits DiT with the
#: distance of the first block's timestep-modulated input (one process, 20 samples, 25 DDIM steps): 0.1 skips 13 of 25
#: steps at a relative L2 deviation of 0.096 (PSNR 27.2 dB) and class accuracy 1.00; 0.05 skips 7 (30.3 dB), 0.2 18
#: (25.3 dB).
DEFAULT_THRESHOLDS: dict[str, float] = {"fbcache": 0.2, "teacache": 0.1}


@dataclass(frozen=True)
class CacheOptions:
    """The schedule of step caching. A "step" is one DiT call of a batch (per diffusers cache context, e.g. "cond" and
    "uncond" when a pipeline calls the transformer twice per step; per micro-batch under micro-batch pipelining).

    Args:
        warmup_steps: the first steps of every batch always run every block (at least 1: the caches fill there).
        final_steps: the last steps of every batch always run every block. Needs the number of steps: ``num_steps``,
            else the ``num_inference_steps`` a diffusers pipeline gives its ``cache_context``, else the
            LightningModule's ``num_inference_steps`` attribute (``DiffusionSampler``); without any of them it cannot
            apply (logged once).
        max_skips: at most this many skipped steps in a row (``None``: no limit).
        num_steps: DiT calls per batch and cache context (``None``: found as described for ``final_steps``).
        first_blocks: fbcache: the blocks (in the plan's execution order) that always run and whose output decides.
        rescale: teacache: coefficients of a polynomial (highest degree first, as TeaCache's ``numpy.poly1d``) applied
            to each step's relative distance before it is accumulated, e.g. TeaCache's fit for FLUX.1
            ``(498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)``; ``None``: the distance itself.
    """

    warmup_steps: int = 1
    final_steps: int = 1
    max_skips: int | None = None
    num_steps: int | None = None
    first_blocks: int = 1
    rescale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rescale, Sequence) and not isinstance(self.rescale, str):  # Hydra gives a ListConfig
            object.__setattr__(self, "rescale", tuple(self.rescale))
        checks = {
            "warmup_steps": _int(self.warmup_steps) and self.warmup_steps >= 1,
            "final_steps": _int(self.final_steps) and self.final_steps >= 0,
            "max_skips": self.max_skips is None or (_int(self.max_skips) and self.max_skips >= 1),
            "num_steps": self.num_steps is None or (_int(self.num_steps) and self.num_steps >= 1),
            "first_blocks": _int(self.first_blocks) and self.first_blocks >= 1,
            "rescale": self.rescale is None or _coefficients(self.rescale),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"Invalid cache_options {bad}: warmup_steps and first_blocks must be integers >= 1, final_steps an"
                f" integer >= 0, max_skips and num_steps None or integers >= 1, rescale None or a non-empty list of"
                f" finite numbers; got {self}."
            )


@dataclass(frozen=True)
class StepCacheConfig:
    """A resolved step-cache request: the method, its threshold (the method's default when none was given) and the
    schedule."""

    method: CacheMethod
    threshold: float
    options: CacheOptions = field(default_factory=CacheOptions)

    def describe(self) -> str:
        o = self.options
        return (
            f"{self.method} threshold={self.threshold} warmup_steps={o.warmup_steps} final_steps={o.final_steps}"
            f" max_skips={o.max_skips}"
            + (f" first_blocks={o.first_blocks}" if self.method == "fbcache" else "")
            + (f" rescale={list(o.rescale)}" if o.rescale else "")
        )


def cache_config(
    cache: str | None,
    cache_threshold: float | None = None,
    cache_options: CacheOptions | Mapping[str, Any] | None = None,
) -> StepCacheConfig | None:
    """Validate the strategy arguments ``cache``, ``cache_threshold`` and ``cache_options`` (pure: the same
    ``ValueError`` on every rank). ``None`` when caching is off.

    Raises:
        ValueError: for an unknown method, a negative or non-numeric threshold, unknown or invalid options, or a
            threshold / options given without a method (they would be ignored).
    """
    if cache is None:
        if cache_threshold is not None or cache_options:
            raise ValueError(
                f"cache_threshold={cache_threshold!r} and cache_options={cache_options!r} need cache='fbcache' or"
                " 'teacache'; got cache=None."
            )
        return None
    if cache not in CACHE_METHODS:
        raise ValueError(f"cache must be None or one of {list(CACHE_METHODS)}; got {cache!r}.")
    threshold = DEFAULT_THRESHOLDS[cache] if cache_threshold is None else cache_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"cache_threshold must be a number >= 0 (0: never skip); got {cache_threshold!r}.")
    options = _options(cache_options)
    if options.rescale is not None and cache != "teacache":
        raise ValueError(f"cache_options rescale applies to cache='teacache' only; got cache={cache!r}.")
    return StepCacheConfig(cache, float(threshold), options)


def _options(value: CacheOptions | Mapping[str, Any] | None) -> CacheOptions:
    if value is None:
        return CacheOptions()
    if isinstance(value, CacheOptions):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"cache_options must be a CacheOptions, a dict or None; got {type(value).__name__}.")
    known = {f.name for f in fields(CacheOptions)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"Unknown cache_options {unknown}; known: {sorted(known)}.")
    return CacheOptions(**{str(k): v for k, v in value.items()})


def _coefficients(value: object) -> bool:
    """A non-empty tuple of finite numbers."""
    numbers = isinstance(value, tuple) and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in value)
    return numbers and len(value) > 0 and all(math.isfinite(c) for c in value)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
