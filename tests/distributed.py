"""Multi-rank test helpers (the implementation lives in the package so benchmarks share it)."""

from lightning_dit_parallel.utils.multiprocess import free_port, run_on_ranks

__all__ = ["free_port", "run_on_ranks"]
