"""Step caching (First-Block Cache, TeaCache-style): skip the transformer blocks of steps whose output would barely
change, one decision per model-parallel group (``apply.py``), on every exact parallel layout."""

from lightning_dit_parallel.parallel.cache.apply import (
    DECISION_AXES,
    apply_step_cache,
    check_step_cache,
    decision_group,
)
from lightning_dit_parallel.parallel.cache.options import (
    CACHE_METHODS,
    DEFAULT_THRESHOLDS,
    CacheMethod,
    CacheOptions,
    StepCacheConfig,
    cache_config,
)
from lightning_dit_parallel.parallel.cache.step_cache import CacheStats, StepCache

__all__ = [
    "CACHE_METHODS",
    "DECISION_AXES",
    "DEFAULT_THRESHOLDS",
    "CacheMethod",
    "CacheOptions",
    "CacheStats",
    "StepCache",
    "StepCacheConfig",
    "apply_step_cache",
    "cache_config",
    "check_step_cache",
    "decision_group",
]
