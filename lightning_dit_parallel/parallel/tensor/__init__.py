"""Tensor parallelism: attention heads and MLP features of every planned block split over the ``tp`` mesh axis with
torch's DTensor tensor-parallel styles (``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``)."""

from lightning_dit_parallel.parallel.tensor.parallelize import (
    TensorParallel,
    apply_tensor_parallel,
    check_deferred_packed,
)
from lightning_dit_parallel.parallel.tensor.resolve import TensorParallelLayout, check_layout, resolve_layout

__all__ = [
    "TensorParallel",
    "TensorParallelLayout",
    "apply_tensor_parallel",
    "check_deferred_packed",
    "check_layout",
    "resolve_layout",
]
