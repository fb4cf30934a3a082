"""``FSDPInferenceStrategy``: parameters sharded per transformer block (FSDP2), optionally with sequence parallel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from lightning_dit_parallel.parallel.layout import Degree
from lightning_dit_parallel.strategies.base import DiTParallelStrategy


class FSDPInferenceStrategy(DiTParallelStrategy):
    """FSDP inference: every rank keeps 1/N of each transformer block; its Linears are computed from every rank's rows
    in turn, the rest gathered just before it runs (``fsdp_units``: whole blocks or weight layers instead).

    The N ranks are all ranks that compute with the same weights. Alone (``dp`` takes the whole world)
    each rank generates its own samples from one sharded copy; with ``ulysses_degree=4`` on 4 ranks the
    four sequence-parallel ranks generate one sample together from one sharded copy.

    Args:
        ulysses_degree: Ulysses sequence-parallel degree.
        ring_degree: ring-attention sequence-parallel degree.
        shard_modules: modules to shard besides the DiT, e.g. ``["pipe.text_encoder"]``; default ``None``: every
            transformers encoder of the module (text and image encoders); ``[]``: none.
        dp_degree: data-parallel groups; ``"auto"`` (default) takes whatever the other degrees leave (1 when another
            degree is ``"auto"``; see ``ParallelLayout.requested``).
        **kwargs: the keyword arguments of ``DiTParallelStrategy`` (``parallel_vae``, ``cfg_degree``, ``timeout``,
            ``start_method`` ...).

    Example:
        >>> trainer = L.Trainer(devices=4, strategy=FSDPInferenceStrategy(ulysses_degree=4))  # doctest: +SKIP
    """

    strategy_name = "dit_fsdp"

    def __init__(
        self,
        ulysses_degree: Degree = 1,
        ring_degree: Degree = 1,
        shard_modules: Sequence[str] | None = None,
        dp_degree: Degree = "auto",
        **kwargs: Any,
    ) -> None:
        if "fsdp" in kwargs:
            raise TypeError(f"{type(self).__name__} always shards (fsdp=True); use DiTParallelStrategy for fsdp=False.")
        super().__init__(
            dp_degree=dp_degree,
            ulysses_degree=ulysses_degree,
            ring_degree=ring_degree,
            fsdp=True,
            shard_modules=shard_modules,
            **kwargs,
        )

    @classmethod
    @override
    def registered_names(cls) -> dict[str, tuple[str, dict[str, Any]]]:
        return {cls.strategy_name: ("FSDP inference of a DiT (parameters sharded per block)", {})}
