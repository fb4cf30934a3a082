"""What a rank holds: parameter and buffer bytes (local shards only, each storage once) and peak memory."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank stores: the local shard of a DTensor, else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def resident_bytes(module: nn.Module, buffers: bool = True) -> int:
    """Bytes of the parameters (and buffers) ``module`` holds on this rank.

    Counts the local shard of a DTensor, each storage once (tied weights are not counted twice) and
    nothing for tensors on the meta device.
    """
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        local = local_tensor(t)
        if local.device.type == "meta":
            continue
        storage = local.untyped_storage()
        key = (str(local.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def reset_peak_rss() -> bool:
    """Reset the process' peak resident set size (Linux ``clear_refs``); ``False`` where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux), or the peak where ``/proc`` is unavailable."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Peak resident set size of this process in bytes since start or the last ``reset_peak_rss``."""
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # "VmRSS:   12345 kB"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
