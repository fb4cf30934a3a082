"""Bring your own DiT: the facebookresearch-style DiT of ``examples/own_dit.py``, parallelized by its ``dit_plan``
class attribute only, equals its one-process output under Ulysses, Ring and USP on 2 and 4 ranks, every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.own_dit import DiT, make_module, requests
from lightning_dit_parallel import SequenceParallelStrategy, plan_for
from lightning_dit_parallel.app.sampling import DiffusionSampler
from lightning_dit_parallel.parallel.compose import parallelize
from lightning_dit_parallel.parallel.layout import ParallelLayout
from tests.distributed import run_on_ranks
from tests.models import sharpen_attention
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single
from tests.test_families import LAYOUTS


def own_dit_module(size: int, num_heads: int = 4) -> DiffusionSampler:
    """A fresh seeded DiT on (4, size, size) latents: (size/2)**2 tokens; attention sharpened."""
    torch.manual_seed(0)
    return make_module(sharpen_attention(DiT(input_size=size, hidden_size=48, num_heads=num_heads).eval()), steps=3)


def test_plan_is_the_class_attribute():
    assert plan_for(DiT) is DiT.dit_plan
    assert plan_for(DiT()).blocks == ("blocks",)


@pytest.mark.parametrize("size", [8, 10], ids=["16tokens", "25tokens"])
def test_own_dit_sequence_parallel_equals_one_process(size: int, tmp_path: Path, record_property):
    reference = predict_single(own_dit_module(size), requests(2))
    errors = {}
    for name, (devices, degrees) in LAYOUTS.items():
        strategy = SequenceParallelStrategy(**degrees, start_method="fork")
        outputs = predict_on_ranks(own_dit_module(size), requests(2), strategy, devices, tmp_path / name)
        assert len(outputs) == devices
        errors[name] = assert_exact(outputs, reference, f"own DiT {size}x{size} {name}")
    record_property("max_relative_error", errors)


def _parallelize_error(rank: int, world: int) -> str:
    layout = ParallelLayout(ulysses=world).resolve(world)
    with pytest.raises(ValueError) as info:
        parallelize(own_dit_module(8, num_heads=3), layout, layout.build_mesh("cpu"))
    return str(info.value)


def test_heads_not_divisible_found_at_setup():
    """``num_heads`` (timm-style name) is checked before the first forward, on every rank."""
    for message in run_on_ranks(2, _parallelize_error, timeout_s=60):
        assert "3 attention heads cannot be split over ulysses_degree=2" in message, message
        assert "ulysses_degree=1, ring_degree=2" in message, message
