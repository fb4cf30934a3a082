"""``PipelineStrategy``: the transformer blocks cut into stages, one per rank; micro-batch or PipeFusion schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from lightning_dit_parallel.parallel.layout import Degree
from lightning_dit_parallel.parallel.pipeline.options import PipelineMode
from lightning_dit_parallel.strategies.base import DiTParallelStrategy


class PipelineStrategy(DiTParallelStrategy):
    """Pipeline parallelism: every rank holds one stage of the transformer blocks (about 1/N of the parameters).

    ``mode="microbatch"`` is exact: the batch reaching the DiT (the doubled CFG batch included) is cut into
    micro-batches that flow through the stages. ``mode="pipefusion"`` is approximate: the image tokens are
    cut into ``num_patches`` patches that flow through the stages, and attention uses the previous step's
    keys and values for the patches not yet computed; the first ``warmup_steps`` steps of each batch are
    exact. Every rank returns the whole output.

    The schedule is a ``PipelineOptions`` (``pipeline=PipelineOptions(mode="pipefusion", num_patches=4)``); ``mode``,
    ``num_patches``, ``warmup_steps``, ``layers_per_stage`` and ``num_microbatches`` fill its fields (``None``: the
    field's default; a field given both ways with different values is a ``TypeError``).

    Args:
        pp_degree: number of stages; ``"auto"`` (default): the whole world.
        mode: ``"microbatch"`` (default) or ``"pipefusion"``.
        num_patches: PipeFusion patches per step (default: the number of stages); at most the token count (the
            first patches take one token more when it does not divide). PipeFusion only: an error in micro-batch mode.
        warmup_steps: PipeFusion steps per batch run unpatched (default 1).
        layers_per_stage: blocks per stage (default: an even split); must sum to the number of blocks.
        num_microbatches: micro-batches per DiT call (default: the number of stages; at most the batch size).
            Micro-batch mode only: an error with PipeFusion.
        dp_degree: data-parallel groups; ``"auto"`` (default) takes whatever the other degrees leave (1 when another
            degree is ``"auto"``; see ``ParallelLayout.requested``).
        **kwargs: the keyword arguments of ``DiTParallelStrategy`` (``pipeline``, ``text_tokens`` for PipeFusion with
            joint attention, ``ulysses_degree``/``ring_degree`` inside each stage, ``parallel_vae``, ``timeout`` ...).

    Example:
        >>> strategy = PipelineStrategy(pp_degree=2, mode="pipefusion", num_patches=4)  # doctest: +SKIP
        >>> L.Trainer(devices=2, strategy=strategy).predict(module, prompts)  # doctest: +SKIP
    """

    strategy_name = "dit_pipeline"

    def __init__(
        self,
        pp_degree: Degree = "auto",
        mode: PipelineMode | None = None,
        num_patches: int | None = None,
        warmup_steps: int | None = None,
        layers_per_stage: Sequence[int] | None = None,
        num_microbatches: int | None = None,
        dp_degree: Degree = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dp_degree=dp_degree,
            pp_degree=pp_degree,
            pp_mode=mode,
            num_patches=num_patches,
            warmup_steps=warmup_steps,
            layers_per_stage=layers_per_stage,
            num_microbatches=num_microbatches,
            **kwargs,
        )

    @classmethod
    @override
    def registered_names(cls) -> dict[str, tuple[str, dict[str, Any]]]:
        return {
            name: (f"Pipeline-parallel DiT inference over all ranks ({mode})", {"mode": mode})
            for name, mode in (("dit_pipeline", "microbatch"), ("dit_pipefusion", "pipefusion"))
        }
