"""Lightning strategies for parallel DiT inference, and their option objects (``PipelineOptions``,
``DistriFusionOptions``, ``AutoOptions``; see ``options.py``)."""

from lightning_dit_parallel.parallel.distrifusion.options import DistriFusionOptions
from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions
from lightning_dit_parallel.strategies.base import DiTParallelStrategy
from lightning_dit_parallel.strategies.fsdp import FSDPInferenceStrategy
from lightning_dit_parallel.strategies.options import AutoOptions
from lightning_dit_parallel.strategies.patch import PatchParallelStrategy
from lightning_dit_parallel.strategies.pipeline import PipelineStrategy
from lightning_dit_parallel.strategies.presets import SequenceParallelStrategy, TensorParallelStrategy
from lightning_dit_parallel.strategies.single_device import CachedSingleDeviceStrategy

__all__ = [
    "AutoOptions",
    "CachedSingleDeviceStrategy",
    "DiTParallelStrategy",
    "DistriFusionOptions",
    "FSDPInferenceStrategy",
    "PatchParallelStrategy",
    "PipelineOptions",
    "PipelineStrategy",
    "SequenceParallelStrategy",
    "TensorParallelStrategy",
]


def register_all() -> None:
    """Register every strategy name with Lightning's registry (idempotent)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for cls in (
        DiTParallelStrategy,
        SequenceParallelStrategy,
        FSDPInferenceStrategy,
        PipelineStrategy,
        TensorParallelStrategy,
        PatchParallelStrategy,
    ):
        cls.register_strategies(StrategyRegistry)
