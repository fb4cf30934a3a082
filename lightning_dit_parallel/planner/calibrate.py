"""Measure on this machine what the planner's time estimate needs: matrix-multiply throughput of one device and the
bandwidth from one device to another (``ldp-plan --calibrate``).

* compute: a square matrix multiply in the run's dtype, after a warm-up, the median of a few repetitions;
* bandwidth: with two CUDA devices, a copy from one to the other; on CPU, a send between two local processes
  (gloo over loopback, one thread each: how this project's CPU ranks talk); with a single CUDA device there is no
  link to measure and ``None`` is returned;
* memory: the device's total memory (CUDA), or this machine's memory divided by the devices (CPU).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Calibration:
    """What was measured; ``None`` for what could not be."""

    device: str
    flops: float
    bandwidth: float | None
    memory: int | None

    def describe(self) -> str:
        bw = f"{self.bandwidth / 1e9:.2f} GB/s" if self.bandwidth else "not measured (no second device)"
        mem = f"{self.memory / 2**30:.1f} GiB" if self.memory else "unknown"
        return f"calibrated on {self.device}: {self.flops / 1e12:.3g} TFLOP/s, link {bw}, memory {mem} per device"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 5) -> float:
    """FLOP/s of a ``size x size`` matrix multiply on ``device`` in ``dtype``."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def _send_worker(rank: int, world: int, nbytes: int, reps: int) -> float:
    import torch.distributed as dist

    x = torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(x, 1)
        else:
            dist.recv(x, 0)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def measure_bandwidth(device: torch.device, nbytes: int = 64 * 2**20, reps: int = 5) -> float | None:
    """Bytes/s from one device to another (see the module docstring); ``None`` with one CUDA device."""
    if device.type == "cuda":
        if torch.cuda.device_count() < 2:
            return None
        x = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        x.to("cuda:1")
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            x.to("cuda:1")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return nbytes / statistics.median(times)
    from lightning_dit_parallel.utils.multiprocess import run_on_ranks

    return run_on_ranks(2, _send_worker, nbytes, reps, reporting=[0], timeout_s=120)[0]


def device_memory(device: torch.device, devices: int) -> int | None:
    """Total memory of one device (CUDA), or this machine's memory shared by ``devices`` processes (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // max(devices, 1)
    except (ValueError, OSError, AttributeError):
        return None


def calibrate(dtype: torch.dtype, devices: int, device: str | None = None) -> Calibration:
    """Measure compute, bandwidth and memory on ``device`` (default: CUDA when available, else CPU)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return Calibration(name, measure_flops(target, dtype), measure_bandwidth(target), device_memory(target, devices))
