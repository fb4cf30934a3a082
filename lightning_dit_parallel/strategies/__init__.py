"""Lightning strategies for parallel DiT inference."""

from lightning_dit_parallel.strategies.base import DiTParallelStrategy
from lightning_dit_parallel.strategies.fsdp import FSDPInferenceStrategy
from lightning_dit_parallel.strategies.patch import PatchParallelStrategy
from lightning_dit_parallel.strategies.pipeline import PipelineStrategy
from lightning_dit_parallel.strategies.presets import SequenceParallelStrategy, TensorParallelStrategy
from lightning_dit_parallel.strategies.single_device import CachedSingleDeviceStrategy

__all__ = [
    "CachedSingleDeviceStrategy",
    "DiTParallelStrategy",
    "FSDPInferenceStrategy",
    "PatchParallelStrategy",
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
