"""PipeFusion through ``Trainer.predict`` for joint-attention and video families and together with sequence, CFG
and data parallelism: with warm-up = all steps every step runs unpatched, so the samples equal the one-process ones
(float32, relative 1e-5, every rank). (The patched path itself is checked exactly in ``test_patch_zoo.py``.)

One launch per world size; every rank runs several ``trainer.predict`` calls in a row (``tests/in_process.py``),
each against the plain sampling of the same seeded module in that process.
"""

from __future__ import annotations

import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy, PipelineStrategy
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.models import (
    build_dit,
    build_sd3,
    build_wan,
    dit_sampler,
    flux_sampler,
    requests,
    sd3_sampler,
    text_requests,
    wan_sampler,
)
from tests.test_pipeline import flux

STEPS = 3

FAMILIES = {
    "dit": (lambda: dit_sampler(build_dit(layers=4), steps=STEPS), lambda: requests(n=4, batch_size=2)),
    # 2 double- and 3 single-stream blocks; 15 image tokens (5 x 3) and 7 text tokens divide neither 2 nor 4
    "flux": (lambda: flux_sampler(flux(), height=5, width=3, steps=STEPS), lambda: text_requests(n=4, batch_size=2)),
    "sd3": (lambda: sd3_sampler(build_sd3(), steps=STEPS), lambda: text_requests(n=4, batch_size=2)),
    "wan": (lambda: wan_sampler(build_wan(), steps=STEPS), lambda: text_requests(n=4, batch_size=2)),
}


def _pipefusion(text_tokens: str, patches: int = 3, **degrees) -> DiTParallelStrategy:
    return DiTParallelStrategy(
        pp_degree=2, pp_mode="pipefusion", num_patches=patches, warmup_steps=STEPS, text_tokens=text_tokens, **degrees
    )


#: world size -> [(label, family, strategy factory)]
def _pipeline_strategy(text_tokens: str) -> PipelineStrategy:
    return PipelineStrategy(mode="pipefusion", num_patches=3, warmup_steps=STEPS, text_tokens=text_tokens)


RUNS = {
    2: [
        *((f"{family} pp2 {mode}", family, lambda mode=mode: _pipeline_strategy(mode))
          for family in ("flux", "sd3", "wan") for mode in ("per_step", "every_patch")),
    ],
    4: [
        *((f"{family} pp2 x ulysses2", family, lambda: _pipefusion("per_step", ulysses_degree=2))
          for family in ("dit", "flux", "sd3")),
        *((f"{family} pp2 x ring2", family, lambda: _pipefusion("every_patch", ring_degree=2))
          for family in ("dit", "flux", "wan")),
        ("dit cfg2 x pp2", "dit", lambda: _pipefusion("per_step", cfg_degree=2)),
        ("flux dp2 x pp2", "flux", lambda: _pipefusion("per_step", dp_degree=2)),
    ],
}


def _predict_all(rank: int, world: int, ports: tuple[int, int]) -> list[str]:
    failures = []
    references: dict[str, torch.Tensor] = {}
    with external_launch(rank, world, *ports):
        for label, family, make in RUNS[world]:
            build, data = FAMILIES[family]
            if family not in references:
                references[family] = torch.cat([build().sample(batch) for batch in data()])  # the one-process output
            strategy = make()
            out = predict_here(build(), data(), strategy, world)
            layout = strategy.layout
            dp, dp_rank = int(layout.dp), layout.coordinates(rank)["dp"]
            # the predict sampler deals samples round-robin over the dp groups: batches of 2 of every dp-th sample
            expected = references[family][dp_rank::dp]
            error = None
            if out.shape == expected.shape:
                error = ((out - expected).abs().max() / expected.abs().max()).item()
            if error is None or not error <= 1e-5:
                failures.append(f"{label}, rank {rank}: output {tuple(out.shape)}, relative error {error}")
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_pipefusion_with_all_warmup_steps_equals_one_process(world):
    results = run_on_ranks(world, _predict_all, (free_port(), free_port()), timeout_s=600)
    failures = [f for rank_failures in results for f in rank_failures]
    assert not failures, "\n".join(failures)
