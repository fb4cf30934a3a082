"""Named presets of ``DiTParallelStrategy`` and the names they register for ``Trainer(strategy="...")``."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_dit_parallel.parallel.layout import Degree
from lightning_dit_parallel.strategies.base import DiTParallelStrategy


class SequenceParallelStrategy(DiTParallelStrategy):
    """Sequence parallelism: Ulysses, Ring, or both (USP, Ulysses inside, Ring outside).

    Args:
        ulysses_degree: ranks exchanging heads for sequence with all-to-all (heads must divide by it).
        ring_degree: ranks passing keys and values around a ring (no constraint on heads).
        dp_degree: data-parallel groups; ``"auto"`` (default) takes whatever the other degrees leave (1 when another
            degree is ``"auto"``; see ``ParallelLayout.requested``).
        **kwargs: the keyword arguments of ``DiTParallelStrategy`` (``parallel_vae``, ``timeout``, ``start_method``
            ...).

    Example:
        >>> trainer = L.Trainer(  # doctest: +SKIP
        ...     devices=4, strategy=SequenceParallelStrategy(ulysses_degree=2, ring_degree=2)
        ... )
    """

    strategy_name = "dit_ulysses"  # the first of the names it registers

    def __init__(
        self, ulysses_degree: Degree = 1, ring_degree: Degree = 1, dp_degree: Degree = "auto", **kwargs: Any
    ) -> None:
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


class TensorParallelStrategy(DiTParallelStrategy):
    """Tensor parallelism: every block's attention heads and MLP features split over ``tp_degree`` ranks.

    Built with torch's DTensor tensor-parallel API: the query/key/value projections and MLP up projections
    column-wise, the attention output and MLP down projections row-wise (two all-reduces of the hidden states per
    block), adaLN modulation column-wise with its (per-sample) output gathered; a rank holds about 1/N of every
    block. The plan may declare the layout (``DiTPlan.tensor_parallel``); diffusers' ``_tp_plan`` is used where a
    class has one. Composes with Ulysses / Ring (heads split over ``tp_degree * ulysses_degree``), CFG parallel, data
    parallel and FSDP (2-D: FSDP shards the tensor-parallel shards over the other axes).

    Args:
        tp_degree: ranks sharing each block; heads must divide by ``tp_degree * ulysses_degree``. ``"auto"``
            (default): the whole world.
        ulysses_degree: Ulysses sequence-parallel degree (splits each rank's heads further).
        ring_degree: ring-attention sequence-parallel degree.
        dp_degree: data-parallel groups; ``"auto"`` (default) takes whatever the other degrees leave (1 when another
            degree is ``"auto"``; see ``ParallelLayout.requested``).
        **kwargs: the keyword arguments of ``DiTParallelStrategy`` (``cfg_degree``, ``fsdp``, ``timeout`` ...).

    Example:
        >>> trainer = L.Trainer(devices=2, strategy=TensorParallelStrategy(tp_degree=2))  # doctest: +SKIP
    """

    strategy_name = "dit_tp"

    def __init__(
        self,
        tp_degree: Degree = "auto",
        ulysses_degree: Degree = 1,
        ring_degree: Degree = 1,
        dp_degree: Degree = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dp_degree=dp_degree, ulysses_degree=ulysses_degree, ring_degree=ring_degree, tp_degree=tp_degree, **kwargs
        )

    @classmethod
    @override
    def registered_names(cls) -> dict[str, tuple[str, dict[str, Any]]]:
        description = "Tensor-parallel DiT inference over all ranks (tp_degree=auto)"
        return {cls.strategy_name: (description, {"tp_degree": "auto"})}
