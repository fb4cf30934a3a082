"""``CachedSingleDeviceStrategy``: Lightning's one-device strategy with optional step caching (``ldp-predict
strategy=none strategy.cache=fbcache``). With ``cache=None`` it is Lightning's ``SingleDeviceStrategy`` unchanged, the
reference every parallel strategy reproduces."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_dit_parallel.parallel.cache.apply import apply_step_cache, check_step_cache
from lightning_dit_parallel.parallel.cache.options import CacheMethod, CacheOptions, cache_config
from lightning_dit_parallel.parallel.cache.step_cache import CacheStats, StepCache


class CachedSingleDeviceStrategy(SingleDeviceStrategy):
    """One process, one device; with ``cache``, the planned DiTs skip steps as under ``DiTParallelStrategy``.

    Args:
        device: the device (``"cpu"``, ``"cuda:0"`` ...).
        cache, cache_threshold, cache_options: as for ``DiTParallelStrategy``.
        **kwargs: the keyword arguments of Lightning's ``SingleDeviceStrategy``.
    """

    def __init__(
        self,
        device: Any = "cpu",
        *,
        cache: CacheMethod | None = None,
        cache_threshold: float | None = None,
        cache_options: CacheOptions | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, **kwargs)
        self._cache = cache_config(cache, cache_threshold, cache_options)
        self._caches: list[StepCache] = []
        self._pipelines = None

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self._cache is None:
            return
        from lightning_dit_parallel.registry import find_planned_modules
        from lightning_dit_parallel.utils.pipelines import attach_pipelines

        module = self.lightning_module
        self._pipelines = attach_pipelines(module, show_progress=True)  # pipelines held as attributes join the tree
        planned = find_planned_modules(module)
        for _, dit, plan in planned:
            check_step_cache(self._cache, dit, plan)
        self._caches = [apply_step_cache(dit, plan, self._cache, steps_source=module) for _, dit, plan in planned]

    def step_cache_stats(self) -> list[CacheStats]:
        """This batch's ``CacheStats``, one per DiT (``[]`` without caching)."""
        return [cache.stats for cache in self._caches]

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        for cache in self._caches:
            cache.begin_batch()
        return super().predict_step(*args, **kwargs)

    @override
    def teardown(self) -> None:
        for cache in self._caches:
            cache.remove()
        self._caches = []
        if self._pipelines is not None:
            self._pipelines.detach()
            self._pipelines = None
        super().teardown()
