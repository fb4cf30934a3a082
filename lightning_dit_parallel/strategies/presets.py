"""Named presets of ``DiTParallelStrategy`` and the names they register for ``Trainer(strategy="...")``."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_dit_parallel.layout import Degree
from lightning_dit_parallel.strategies.base import DiTParallelStrategy


class SequenceParallelStrategy(DiTParallelStrategy):
    """Sequence parallelism: Ulysses, Ring, or both (USP, Ulysses inside, Ring outside).

    Args:
        ulysses_degree: ranks exchanging heads for sequence with all-to-all (heads must divide by it).
        ring_degree: ranks passing keys and values around a ring (no constraint on heads).
        dp_degree: data-parallel groups; ``"auto"`` (default) takes whatever the world size leaves.
        **kwargs: the keyword arguments of ``DiTParallelStrategy`` (``timeout``, ``start_method`` ...).

    Example:
        >>> trainer = L.Trainer(devices=4, strategy=SequenceParallelStrategy(ulysses_degree=2, ring_degree=2))  # doctest: +SKIP
    """

    strategy_name = "dit_ulysses"  # the first of the names it registers

    def __init__(self, ulysses_degree: Degree = 1, ring_degree: Degree = 1, dp_degree: Degree = "auto", **kwargs: Any) -> None:
        if "auto" in (ulysses_degree, ring_degree) and dp_degree == "auto":
            dp_degree = 1
        super().__init__(dp_degree=dp_degree, ulysses_degree=ulysses_degree, ring_degree=ring_degree, **kwargs)

    @classmethod
    @override
    def registered_names(cls) -> dict[str, tuple[str, dict[str, Any]]]:
        entries: dict[str, dict[str, Any]] = {
            "dit_ulysses": {"ulysses_degree": "auto"},
            "dit_ring": {"ring_degree": "auto"},
            "dit_usp": {"ring_degree": 2, "ulysses_degree": "auto"},
        }
        return {
            name: (f"Sequence parallel DiT inference ({', '.join(f'{k}={v}' for k, v in degrees.items())})", degrees)
            for name, degrees in entries.items()
        }
