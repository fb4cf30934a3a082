"""DistriFusion's strategy without launching ranks: registered name, options, Hydra config. (Predictions are checked in
``test_patch_predicts.py``, the stale path for every zoo family in ``test_patch_zoo.py``.)"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from lightning.pytorch.strategies import StrategyRegistry

from lightning_dit_parallel import PatchParallelStrategy
from lightning_dit_parallel.parallel.composition import check_composition
from lightning_dit_parallel.parallel.layout import ParallelLayout


def test_registered_name_and_options():
    strategy = StrategyRegistry.get("dit_distrifusion")
    assert isinstance(strategy, PatchParallelStrategy)
    assert strategy._requested_layout.ring == "auto" and strategy._requested_layout.dp == 1
    assert strategy._distrifusion.warmup_steps == 1
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=rf"warmup_steps must be an integer >= 1 .*; got {bad}"):
            PatchParallelStrategy(warmup_steps=bad)
    with pytest.raises(TypeError, match=r"sets \['pp_degree', 'ulysses_degree'\] itself"):
        PatchParallelStrategy(ulysses_degree=2, pp_degree=2)
    composed = PatchParallelStrategy(degree=2, cfg_degree=2)
    layout = composed._requested_layout
    assert (layout.ring, layout.cfg, layout.dp) == (2, 2, "auto")


def test_layouts_it_runs_on():
    """The patches are the ring axis of a layout without pipeline stages, Ulysses or tensor parallelism (checked on
    every rank); FSDP composes."""
    check_composition(ParallelLayout(ring=2, cfg=2, dp=2).resolve(8), distrifusion=True)
    check_composition(ParallelLayout(ring=2, dp=2, fsdp=True).resolve(4), distrifusion=True)
    for degrees in (dict(ring=2, pp=2), dict(ring=2, ulysses=2), dict(ring=2, tp=2), dict(dp=2)):
        with pytest.raises(ValueError, match="DistriFusion needs its patches on the ring axis"):
            check_composition(ParallelLayout(**degrees).resolve(4 if len(degrees) == 2 else 2), distrifusion=True)
    with pytest.raises(ValueError, match="DistriFusion needs its patches on the ring axis"):
        PatchParallelStrategy(degree=2, tp_degree=2)


def test_hydra_config():
    with initialize_config_module("lightning_dit_parallel.app.conf", version_base=None):
        config = compose("predict", overrides=["strategy=distrifusion", "strategy.warmup_steps=2"])
    strategy = instantiate(config.strategy)
    assert isinstance(strategy, PatchParallelStrategy) and strategy._distrifusion.warmup_steps == 2
