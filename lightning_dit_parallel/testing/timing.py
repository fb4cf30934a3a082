"""Timing inside a multi-rank benchmark: every rank at once, or rank 0 alone while the others wait."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def time_all_ranks(fn: Callable[[], object]) -> tuple[float, float]:
    """Run ``fn`` on every rank at once (a collective: call on every rank).

    Returns the wall and CPU seconds of the slowest rank: the slowest rank sets the latency.
    """
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start, time.process_time() - cpu])  # (wall, cpu)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed[0].item(), elapsed[1].item()


def time_rank_zero(fn: Callable[[], object]) -> tuple[float, float]:
    """Run ``fn`` on rank 0 alone while the other ranks wait at a barrier: the one-process figure.

    Returns rank 0's wall and CPU seconds (zeros on the other ranks). A collective: call on every rank.
    """
    dist.barrier()
    elapsed = (0.0, 0.0)
    if dist.get_rank() == 0:
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        elapsed = (time.perf_counter() - start, time.process_time() - cpu)
    dist.barrier()
    return elapsed
