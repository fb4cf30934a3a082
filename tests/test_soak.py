"""Soak: 50 ``trainer.predict`` calls in one process per rank, alternating strategy presets on one module.

Resident memory, open file descriptors and threads are read after every predict; after a warm-up they must stay
bounded (no growth per predict), every output must equal the one-process output, and the figures are recorded
(``pytest -rA`` shows them; the README's "Failure behaviour" section quotes them).
"""

from __future__ import annotations

import os
import threading

from lightning_dit_parallel import (
    DiTParallelStrategy,
    FSDPInferenceStrategy,
    PipelineStrategy,
    SequenceParallelStrategy,
)
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.models import build_dit, dit_sampler, requests

PREDICTS = 50
WARMUP = 10
STEPS = 2

PRESETS = [
    lambda: SequenceParallelStrategy(ulysses_degree=2),
    lambda: SequenceParallelStrategy(ring_degree=2),
    lambda: PipelineStrategy(pp_degree=2),
    lambda: PipelineStrategy(pp_degree=2, mode="pipefusion", warmup_steps=STEPS),
    lambda: FSDPInferenceStrategy(ulysses_degree=2),
    lambda: DiTParallelStrategy(cfg_degree=2),
]


def _resources() -> dict[str, float]:
    with open("/proc/self/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {
        "rss_mib": rss_kib / 1024,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
    }


def _soak(rank: int, world: int, ports: tuple[int, int]) -> dict:
    module = dit_sampler(build_dit(), steps=STEPS)
    reference = module.sample(next(iter(requests(2))))
    readings, worst = [], 0.0
    with external_launch(rank, world, *ports):
        for i in range(PREDICTS):
            out = predict_here(module, requests(2), PRESETS[i % len(PRESETS)](), world)
            worst = max(worst, ((out - reference).abs().max() / reference.abs().max()).item())
            readings.append(_resources())
    return {"readings": readings, "worst_error": worst}


def test_fifty_predicts_alternating_strategies_stay_bounded(record_property):
    results = run_on_ranks(2, _soak, (free_port(), free_port()), timeout_s=600)
    summary = {}
    for rank, result in enumerate(results):
        assert result["worst_error"] <= 1e-5, f"rank {rank}: error {result['worst_error']:.2e}"
        readings = result["readings"]
        first, warm, last = readings[0], readings[WARMUP - 1], readings[-1]
        per_predict_mib = (last["rss_mib"] - warm["rss_mib"]) / (PREDICTS - WARMUP)
        summary[rank] = {"first": first, "after_warmup": warm, "last": last, "rss_mib_per_predict": per_predict_mib}
        assert last["fds"] <= warm["fds"] + 2, f"rank {rank}: file descriptors grew {warm['fds']} -> {last['fds']}"
        assert last["os_threads"] <= warm["os_threads"] + 2, f"rank {rank}: threads grew {warm} -> {last}"
        assert per_predict_mib < 1.0, f"rank {rank}: resident memory grows {per_predict_mib:.2f} MiB per predict"
    record_property("soak", summary)
    print(summary)
