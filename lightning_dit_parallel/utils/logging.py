"""Rank-aware logging: rank 0 speaks by default."""

from __future__ import annotations

import logging

import torch.distributed as dist

log = logging.getLogger("lightning_dit_parallel")


def rank_zero_log(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on global rank 0 only (or when no process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.log(level, message)
