"""``PatchParallelStrategy``: DistriFusion, displaced patch parallelism over the ranks of a model-parallel group."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions
from lightning_dit_parallel.parallel.layout import Degree
from lightning_dit_parallel.strategies.base import DiTParallelStrategy
from lightning_dit_parallel.strategies.options import with_aliases

#: Arguments of ``DiTParallelStrategy`` that this preset sets itself (``degree`` is the ring degree).
_FIXED = (
    "ring_degree",
    "ulysses_degree",
    "pp_degree",
    "pp_mode",
    "num_patches",
    "layers_per_stage",
    "num_microbatches",
    "text_tokens",
    "pipeline",
)


class PatchParallelStrategy(DiTParallelStrategy):
    """DistriFusion (approximate): every rank holds the whole model and computes its patch of the tokens through all
    layers; self-attention uses its own fresh keys and values and the previous step's keys and values of the other
    patches, all-gathered asynchronously so that the transfer overlaps with a step of compute. The first
    ``warmup_steps`` steps of each batch are exact (sequence parallelism with all-gathered keys and values). Every
    rank returns the whole output.

    The patches are the ``ring`` axis of the mesh, so the layout reads ``ring=<degree>``; it composes with
    ``cfg_degree`` and ``dp_degree`` (and ``fsdp``).

    Args:
        degree: patches (ranks per sample); ``"auto"`` (default): whatever the other degrees leave.
        warmup_steps: exact steps per batch before the stale keys and values are used (default 1); fills
            ``distrifusion=DistriFusionOptions(warmup_steps=...)``, which may be given instead.
        dp_degree: data-parallel groups; ``"auto"`` (default) takes whatever the other degrees leave (1 when another
            degree is ``"auto"``; see ``ParallelLayout.requested``).
        **kwargs: the keyword arguments of ``DiTParallelStrategy`` (``cfg_degree``, ``fsdp``, ``timeout`` ...).

    Raises:
        TypeError: for arguments of another parallelism (``ulysses_degree``, ``pp_degree`` ...).
        ValueError: for ``warmup_steps`` that is not an integer >= 1.

    Example:
        >>> trainer = L.Trainer(devices=4, strategy=PatchParallelStrategy(degree=2, cfg_degree=2))  # doctest: +SKIP
    """

    strategy_name = "dit_distrifusion"

    def __init__(
        self, degree: Degree = "auto", warmup_steps: int | None = None, dp_degree: Degree = "auto", **kwargs: Any
    ) -> None:
        fixed = sorted(set(kwargs) & set(_FIXED))
        if fixed:
            raise TypeError(f"{type(self).__name__} sets {fixed} itself (its patches are the ring axis); use degree=.")
        options = with_aliases(
            kwargs.pop("distrifusion", None),
            DistriFusionOptions,
            {"warmup_steps": warmup_steps},
            {"warmup_steps": "warmup_steps"},
            "distrifusion",
        )
        super().__init__(dp_degree=dp_degree, ring_degree=degree, distrifusion=options, **kwargs)

    @classmethod
    @override
    def registered_names(cls) -> dict[str, tuple[str, dict[str, Any]]]:
        return {cls.strategy_name: ("DistriFusion patch-parallel DiT inference over all ranks", {})}
