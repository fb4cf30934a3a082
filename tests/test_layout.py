"""Layout validation and mesh coordinates (no process group)."""

import pytest

from lightning_dit_parallel import ParallelLayout, SequenceParallelStrategy
from lightning_dit_parallel.strategies import DiTParallelStrategy


def test_resolve_fills_auto():
    layout = ParallelLayout(ring=2, ulysses="auto").resolve(8)
    assert (layout.ulysses, layout.sequence_degree, layout.model_parallel_degree) == (4, 8, 8)


@pytest.mark.parametrize(
    "kwargs, world, match",
    [
        (dict(ulysses=3), 4, "multiply to 3 but the world size is 4"),
        (dict(ulysses=2, ring=2), 2, "multiply to 4 but the world size is 2"),
        (dict(ulysses="auto", ring=3), 4, "does not divide the world size 4"),
    ],
)
def test_resolve_rejects_wrong_products(kwargs, world, match):
    with pytest.raises(ValueError, match=match) as err:
        ParallelLayout(**kwargs).resolve(world)
    # the message names every value
    for name in ("dp=", "cfg=", "pp=", "ring=", "ulysses=", "tp=", "fsdp="):
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ulysses=0), "positive integer"),
        (dict(ring=-2), "positive integer"),
        (dict(dp=1.5), "positive integer"),
        (dict(ulysses=True), "positive integer"),
        (dict(ulysses="auto", ring="auto"), "At most one"),
        (dict(cfg=3), "cfg degree must be 1 or 2"),
        (dict(fsdp="yes"), "fsdp must be a bool"),
    ],
)
def test_invalid_degrees(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout(**kwargs)


def test_coordinates_are_row_major_with_ulysses_innermost():
    layout = ParallelLayout(dp=2, ring=2, ulysses=2).resolve(8)
    assert layout.coordinates(0) == dict(dp=0, cfg=0, pp=0, ring=0, ulysses=0, tp=0)
    assert layout.coordinates(1) == dict(dp=0, cfg=0, pp=0, ring=0, ulysses=1, tp=0)
    assert layout.coordinates(2) == dict(dp=0, cfg=0, pp=0, ring=1, ulysses=0, tp=0)
    assert layout.coordinates(7) == dict(dp=1, cfg=0, pp=0, ring=1, ulysses=1, tp=0)
    with pytest.raises(ValueError, match="outside the world"):
        layout.coordinates(8)


def test_unresolved_layout_refuses_derived_sizes():
    with pytest.raises(RuntimeError, match="resolve"):
        ParallelLayout(ulysses="auto").sequence_degree


def test_strategy_rejects_bad_degrees_at_construction():
    with pytest.raises(ValueError, match="positive integer"):
        SequenceParallelStrategy(ulysses_degree=0)
    with pytest.raises(ValueError, match="start_method"):
        SequenceParallelStrategy(ulysses_degree=2, start_method="thread")


def test_strategy_mesh_before_setup_is_an_error():
    strategy = DiTParallelStrategy(ulysses_degree=2)
    with pytest.raises(RuntimeError, match="before processes have initialized"):
        strategy.device_mesh
    with pytest.raises(RuntimeError, match="setup_environment"):
        strategy.layout


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    for name in ("dit_ulysses", "dit_ring", "dit_usp", "dit_hybrid"):
        assert name in StrategyRegistry
    assert StrategyRegistry["dit_ring"]["init_params"] == {"ring_degree": "auto"}
