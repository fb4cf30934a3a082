"""The fault table: for every strategy preset, one rank exits abruptly in the middle of a step, and separately one
rank raises in ``predict_step``. Every other rank must leave ``trainer.predict`` with an error within the configured
timeout plus 10 s, the ranks leave no process group behind, and afterwards the test process runs another
``trainer.predict`` and has no child processes or environment variables left over.

The ranks run ``Trainer.predict`` in place, as under torchrun (``tests/in_process.py``): a rank that dies is not
reaped by a launcher, so the others must find out through their own collectives.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from lightning_dit_parallel import (
    DiTParallelStrategy,
    FSDPInferenceStrategy,
    PatchParallelStrategy,
    PipelineStrategy,
    SequenceParallelStrategy,
    TensorParallelStrategy,
)
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.models import build_dit, dit_sampler, requests
from tests.rank_outputs import predict_single

TIMEOUT_S = 5.0
STEPS = 2
FAULTY_RANK = 1

#: preset -> (world size, strategy factory with the short timeout)
PRESETS = {
    "ulysses": (2, lambda: SequenceParallelStrategy(ulysses_degree=2, timeout=TIMEOUT_S)),
    "ring": (2, lambda: SequenceParallelStrategy(ring_degree=2, timeout=TIMEOUT_S)),
    "usp": (4, lambda: SequenceParallelStrategy(ulysses_degree=2, ring_degree=2, timeout=TIMEOUT_S)),
    "pipeline": (2, lambda: PipelineStrategy(pp_degree=2, timeout=TIMEOUT_S)),
    "pipefusion": (2, lambda: PipelineStrategy(pp_degree=2, mode="pipefusion", warmup_steps=STEPS, timeout=TIMEOUT_S)),
    "fsdp": (2, lambda: FSDPInferenceStrategy(ulysses_degree=2, timeout=TIMEOUT_S)),
    "cfg": (2, lambda: DiTParallelStrategy(cfg_degree=2, timeout=TIMEOUT_S)),
    "hybrid": (4, lambda: DiTParallelStrategy(cfg_degree=2, ulysses_degree=2, fsdp=True, timeout=TIMEOUT_S)),
    "tp": (2, lambda: TensorParallelStrategy(tp_degree=2, timeout=TIMEOUT_S)),
    "distrifusion": (2, lambda: PatchParallelStrategy(degree=2, timeout=TIMEOUT_S)),  # stale gathers in flight
}


def faulty_sampler(fault: str, rank: int):
    """A DiT sampler that, on ``FAULTY_RANK``, exits or raises at the start of its second batch."""
    module = dit_sampler(build_dit(), steps=STEPS)
    plain_step = module.predict_step

    def predict_step(batch, batch_idx):
        if batch_idx == 1 and rank == FAULTY_RANK:
            if fault == "exit":
                os._exit(1)  # no teardown, no goodbye: the peers find out from a closed connection or the timeout
            raise RuntimeError("injected failure in predict_step")
        return plain_step(batch, batch_idx)

    module.predict_step = predict_step
    return module


def _one_fault(rank: int, world: int, preset: str, fault: str, port: int) -> dict:
    strategy = PRESETS[preset][1]()
    module = faulty_sampler(fault, rank)
    with external_launch(rank, world, port, None):  # a peer may be dead: no group of all ranks on exit
        start = time.monotonic()
        try:
            predict_here(module, requests(4, batch_size=2), strategy, world)
            outcome = "returned"
        except BaseException as err:  # noqa: BLE001 - the outcome is the error's kind
            outcome = type(err).__name__
        seconds = time.monotonic() - start
        left = dist.is_initialized()
    return {"outcome": outcome, "seconds": seconds, "group_left": left}


CASES = [(preset, fault) for preset in PRESETS for fault in ("exit", "raise")]
IDS = [f"{p}-{f}" for p in PRESETS for f in ("exit", "raise")]


@pytest.mark.parametrize("preset, fault", CASES, ids=IDS)
def test_every_other_rank_fails_within_the_timeout(preset, fault, record_property):
    world = PRESETS[preset][0]
    environment = dict(os.environ)
    others = [r for r in range(world) if r != FAULTY_RANK]
    reporting = others if fault == "exit" else list(range(world))
    results = run_on_ranks(world, _one_fault, preset, fault, free_port(), timeout_s=60, reporting=reporting)
    by_rank = dict(zip(reporting, results))
    for rank in others:
        result = by_rank[rank]
        assert result["outcome"] != "returned", f"{preset}/{fault}: rank {rank} finished although a peer failed"
        assert result["seconds"] < TIMEOUT_S + 10, f"{preset}/{fault}: rank {rank} took {result['seconds']:.1f} s"
        assert not result["group_left"], f"{preset}/{fault}: rank {rank} left its process group behind"
    if fault == "raise":
        assert by_rank[FAULTY_RANK]["outcome"] == "RuntimeError"
    record_property("seconds", {r: round(by_rank[r]["seconds"], 1) for r in reporting})
    assert not multiprocessing.active_children(), "a rank process was left behind"
    assert dict(os.environ) == environment, "environment variables changed"


def test_the_parent_predicts_again_after_the_faults():
    """After all the failed launches above, this process still runs a predict (and a parallel one)."""
    output = predict_single(dit_sampler(build_dit(), steps=STEPS), requests(2))
    assert output.shape[0] == 2 and torch.isfinite(output).all()
