"""One source for each layout rule (no processes): every layout up to 8 ranks that the planner lists is one the
strategy accepts, and every one the strategy accepts is listed; ``"auto"`` degrees resolve by one rule."""

from __future__ import annotations

import math
from functools import cache

import pytest

from lightning_dit_parallel import (
    DiTParallelStrategy,
    FSDPInferenceStrategy,
    PatchParallelStrategy,
    PipelineStrategy,
    SequenceParallelStrategy,
    TensorParallelStrategy,
    plan_for,
)
from lightning_dit_parallel.parallel.composition import composition_problems
from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions
from lightning_dit_parallel.parallel.fsdp import SHARD_AXES
from lightning_dit_parallel.parallel.layout import MESH_AXES, ParallelLayout
from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions
from lightning_dit_parallel.planner.layouts import Axes, degrees_allowed, enumerate_layouts, factorizations
from lightning_dit_parallel.planner.spec import model_spec
from tests.models import build_dit

#: A work that limits nothing: enough samples for 8 data-parallel groups (FSDP needs equal batch counts), a doubled
#: CFG batch of 2 rows, more tokens than 4 x 8 PipeFusion patches; no VAE (parallel decode is another dimension).
WORK = dict(rows=2, tokens=64, latent_height=8, samples=840, batch=1, cfg_split=True, has_vae=False)
#: Runtime schedules of one request: the default (micro-batches where pp > 1), PipeFusion, DistriFusion on the ring.
SCHEDULES = ("default", "pipefusion", "distrifusion")


@cache
def spec(name: str):
    """``wide``: heads and blocks that every degree up to 8 divides (only the composition rules refuse);
    ``small``: 4 heads and 2 blocks (the model's own limits refuse more)."""
    model = build_dit(heads=8, layers=8) if name == "wide" else build_dit()
    return model_spec(model, plan_for(model))


def requests(world: int):
    """Every request of ``world`` ranks: degrees (dp, cfg, pp, ring, ulysses, tp), FSDP, schedule."""
    for degrees in factorizations(world, len(MESH_AXES)):
        if degrees[1] > 2:
            continue  # cfg is 1 or 2 (ParallelLayout refuses more before any rule)
        for fsdp in (False, True):
            for schedule in SCHEDULES:
                yield dict(zip(MESH_AXES, degrees)), fsdp, schedule


def strategy_for(degrees: dict[str, int], fsdp: bool, schedule: str) -> DiTParallelStrategy:
    """The strategy of a request (the constructor checks what it can before the world size is known)."""
    return DiTParallelStrategy(
        dp_degree=degrees["dp"],
        cfg_degree=degrees["cfg"],
        pp_degree=degrees["pp"],
        ring_degree=degrees["ring"],
        ulysses_degree=degrees["ulysses"],
        tp_degree=degrees["tp"],
        fsdp=fsdp,
        pipeline=PipelineOptions("pipefusion") if schedule == "pipefusion" else None,
        distrifusion=DistriFusionOptions() if schedule == "distrifusion" else None,
    )


def key(degrees: dict[str, int], fsdp: bool, mode: str, distrifusion: bool) -> tuple:
    """A layout as the runtime sees it; FSDP over a shard group of one rank shards nothing (the same layout as
    without it: the planner lists it once)."""
    shards = math.prod(degrees[axis] for axis in SHARD_AXES)
    return (*degrees.values(), fsdp and shards > 1, mode, distrifusion)


def accepted(world: int, name: str, model_limits: bool = True) -> set[tuple]:
    """What the strategy accepts on ``world`` ranks (constructor and ``resolve_layout``, as in setup_environment)
    and, with ``model_limits``, the model allows (the planner's ``degrees_allowed``, the model-dependent refusals,
    applied to the same degrees)."""
    out = set()
    for degrees, fsdp, schedule in requests(world):
        try:
            strategy_for(degrees, fsdp, schedule).resolve_layout(world)
        except ValueError:
            continue
        distri = schedule == "distrifusion"
        planner = dict(degrees, ring=1 if distri else degrees["ring"], distri=degrees["ring"] if distri else 1)
        if model_limits and not degrees_allowed(spec(name), *planner.values(), **_work(), axes=Axes()):
            continue
        if schedule == "pipefusion" and spec(name).pipefusion_unsupported:
            continue  # the model's refusal (check_pipefusion_plan, read into the spec)
        mode = "none" if degrees["pp"] == 1 else ("pipefusion" if schedule == "pipefusion" else "microbatch")
        out.add(key(degrees, fsdp, mode, distri))
    return out


def listed(world: int, name: str) -> set[tuple]:
    """What the planner lists on ``world`` ranks, as runtime layouts (PipeFusion patch counts collapsed)."""
    out = set()
    for lay in enumerate_layouts(spec(name), world, **WORK):
        runtime = lay.to_parallel_layout()
        degrees = {axis: int(d) for axis, d in runtime.degrees().items()}
        out.add(key(degrees, lay.fsdp, lay.pp_mode, lay.distrifusion > 1))
    return out


def _work() -> dict:
    return {k: WORK[k] for k in ("rows", "tokens", "samples", "batch", "cfg_split")}


@pytest.mark.parametrize("name", ["wide", "small"])
def test_planner_lists_exactly_what_the_strategy_accepts(name):
    total = 0
    for world in range(1, 9):
        strategy, planner = accepted(world, name), listed(world, name)
        assert planner == strategy, (
            f"{world} ranks: listed but refused {sorted(planner - strategy)}; accepted but not listed"
            f" {sorted(strategy - planner)}"
        )
        total += len(planner)
    # the rules refuse something and leave much: neither side is empty or everything
    assert total > 100 if name == "wide" else total > 20


def test_the_model_limits_hide_no_layout_rule():
    """On ranks that divide the wide model's heads and blocks (powers of two) its limits refuse nothing, so there the
    planner's list equals what the strategy alone accepts: a composition rule restated among the model limits
    (``degrees_allowed``) would show up here."""
    for world in (1, 2, 4, 8):
        strategy, planner = accepted(world, "wide", model_limits=False), listed(world, "wide")
        assert planner == strategy, f"{world} ranks: accepted but not listed {sorted(strategy - planner)}"


def test_the_rules_the_planner_once_restated():
    """Tensor parallelism composes with pipeline stages, micro-batches (tests/test_tensor_parallel.py runs tp2_pp2) and
    PipeFusion (tests/test_pipeline.py), and DistriFusion with FSDP (tests/test_patch_predicts.py); DistriFusion
    with tensor parallelism is refused (never run)."""
    wide = listed(4, "wide")
    for mode in ("microbatch", "pipefusion"):
        assert key(dict(dp=1, cfg=1, pp=2, ring=1, ulysses=1, tp=2), False, mode, False) in wide
    assert key(dict(dp=2, cfg=1, pp=1, ring=2, ulysses=1, tp=1), True, "none", True) in wide
    assert key(dict(dp=1, cfg=1, pp=1, ring=2, ulysses=1, tp=2), False, "none", True) not in wide
    assert composition_problems(ParallelLayout(pp=2, tp=2).resolve(4), pipeline=PipelineOptions("pipefusion")) == []
    (problem,) = composition_problems(ParallelLayout(ring=2, tp=2).resolve(4), distrifusion=True)
    assert "DistriFusion needs its patches on the ring axis" in problem and "tp=2" in problem


def test_refusals_name_the_values_and_wait_for_auto_degrees():
    with pytest.raises(ValueError, match="Pipeline options need pp_degree > 1; got pp_degree=1 with mode=pipefusion"):
        DiTParallelStrategy(ulysses_degree=2, pipeline=PipelineOptions("pipefusion"))
    # pp="auto" may resolve to more than one stage: checked again in setup_environment, on every rank
    strategy = PipelineStrategy(mode="pipefusion")
    assert strategy.resolve_layout(2).pp == 2
    with pytest.raises(ValueError, match="Pipeline options need pp_degree > 1"):
        strategy.resolve_layout(1)
    with pytest.raises(ValueError, match="DistriFusion needs its patches on the ring axis"):
        PatchParallelStrategy(degree=2, tp_degree=2)
    with pytest.raises(ValueError, match="shard_modules=\\['text_encoder'\\] needs fsdp=True"):
        SequenceParallelStrategy(ulysses_degree=2, shard_modules=["text_encoder"])


@pytest.mark.parametrize(
    "make, world, expected",
    [
        # dp="auto" yields to any other "auto" degree, whichever preset asks (the presets once had five conditions)
        (lambda: SequenceParallelStrategy(ulysses_degree="auto"), 4, dict(dp=1, ulysses=4)),
        (lambda: SequenceParallelStrategy(ulysses_degree=2), 4, dict(dp=2, ulysses=2)),
        (lambda: SequenceParallelStrategy(ulysses_degree=2, cfg_degree="auto"), 4, dict(dp=1, cfg=2, ulysses=2)),
        (lambda: FSDPInferenceStrategy(tp_degree="auto"), 4, dict(dp=1, tp=4, fsdp=True)),
        (lambda: FSDPInferenceStrategy(), 4, dict(dp=4, fsdp=True)),
        (lambda: TensorParallelStrategy(), 4, dict(dp=1, tp=4)),
        (lambda: TensorParallelStrategy(tp_degree=2, pp_degree="auto"), 4, dict(dp=1, pp=2, tp=2)),
        (lambda: PatchParallelStrategy(cfg_degree=2), 4, dict(dp=1, cfg=2, ring=2)),
        (lambda: PatchParallelStrategy(degree=2, cfg_degree="auto"), 4, dict(dp=1, cfg=2, ring=2)),
        (lambda: PipelineStrategy(), 2, dict(dp=1, pp=2)),
        (lambda: PipelineStrategy(pp_degree=2), 4, dict(dp=2, pp=2)),
        (lambda: PipelineStrategy(pp_degree=2, cfg_degree="auto"), 4, dict(dp=1, cfg=2, pp=2)),
        (lambda: DiTParallelStrategy(dp_degree="auto", pp_degree="auto"), 2, dict(dp=1, pp=2)),
    ],
)
def test_auto_degrees_resolve_by_one_rule(make, world, expected):
    layout = make().resolve_layout(world)
    assert layout == ParallelLayout(**expected)


def test_two_auto_degrees_besides_dp_are_refused():
    with pytest.raises(ValueError, match="At most one parallel degree may be 'auto'"):
        SequenceParallelStrategy(ulysses_degree="auto", ring_degree="auto")
