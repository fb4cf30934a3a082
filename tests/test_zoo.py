"""Ulysses, Ring and USP through ``Trainer.predict`` for every family of the model zoo (``tests/zoo/``).

All cases run inside one launch per layout. Each must equal its one-process output (float32, relative 1e-5)
on every rank. ``pytest tests/test_zoo.py --zoo sana,wan_vace`` runs only the named families.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lightning_dit_parallel import SequenceParallelStrategy, plan_for
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from tests.rank_outputs import max_relative_error
from tests.zoo import ZooCase, all_cases, family
from tests.zoo_module import predict_zoo, predict_zoo_single

#: (devices, degrees): Ulysses, Ring on 2 ranks; Ulysses, Ring, USP on 4 ranks.
LAYOUTS = {
    "ulysses2": (2, dict(ulysses_degree=2)),
    "ring2": (2, dict(ring_degree=2)),
    "ulysses4": (4, dict(ulysses_degree=4)),
    "ring4": (4, dict(ring_degree=4)),
    "usp2x2": (4, dict(ulysses_degree=2, ring_degree=2)),
}


def selected_cases(config) -> list[ZooCase]:
    wanted = config.getoption("--zoo")
    cases = list(all_cases())
    if wanted:
        names = set(wanted.split(","))
        unknown = names - {family(c) for c in cases}
        assert not unknown, f"--zoo names unknown families {sorted(unknown)}"
        cases = [c for c in cases if family(c) in names]
    return cases


@pytest.fixture(scope="module")
def cases(request) -> list[ZooCase]:
    return selected_cases(request.config)


@pytest.fixture(scope="module")
def references(cases) -> dict[str, torch.Tensor]:
    return predict_zoo_single(cases)


#: families whose attention needs the whole sequence on a rank (``HeadProjections``): Ulysses only; Ring and USP are
#: refused at setup (tests/test_head_parallel.py)
ULYSSES_ONLY = ("qwenimage21",)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zoo_equals_one_process(layout: str, cases, references, tmp_path: Path, record_property):
    devices, degrees = LAYOUTS[layout]
    if degrees.get("ring_degree", 1) > 1:
        cases = [c for c in cases if family(c) not in ULYSSES_ONLY]
    if not cases:
        pytest.skip(f"no selected family runs under {layout}")
    strategy = SequenceParallelStrategy(**degrees, start_method="fork")
    outputs = predict_zoo(cases, strategy, devices, tmp_path)
    errors: dict[str, float] = {}
    problems = []
    for case in cases:
        reference = references[case.name]
        worst = 0.0
        for rank, out in enumerate(outputs):
            got = out[case.name]
            if got.shape != reference.shape:
                problems.append(f"{case.name} rank {rank}: shape {tuple(got.shape)} != {tuple(reference.shape)}")
                continue
            worst = max(worst, max_relative_error(got, reference))
        errors[case.name] = worst
        if not worst <= 1e-5:
            problems.append(f"{case.name}: max relative error {worst:.2e}")
    record_property("max_relative_error", errors)
    report = os.environ.get("LDP_ZOO_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"layout": layout, "errors": errors}) + "\n")
    assert not problems, f"{layout}: " + "; ".join(problems)


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.name)
def test_plan_hooks_on_one_rank_change_nothing(case: ZooCase):
    """With one sequence-parallel rank every split, gather and attention check of the plan runs (a path, argument
    or concatenation length the model does not have fails here) and the output is bit-identical."""
    model = case.build()
    plan = plan_for(model)
    assert plan is not None, f"{type(model).__name__} has no plan"
    with torch.no_grad():
        reference = case.output(model(**case.inputs(model)))
        handle = apply_sequence_parallel(model, plan, SequenceGroups())
        try:
            output = case.output(model(**case.inputs(model)))
        finally:
            handle.remove()
    assert torch.equal(output, reference)
