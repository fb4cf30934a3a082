"""Ulysses at the attention projections (``HeadProjections``, ``parallel/sequence/head_parallel.py``) for
Qwen-Image 2.1, whose block-causal attention needs the whole sequence: the prefix KV cache (an ``"extract"`` call,
then ``"cached"`` calls that recompute the target tokens only) equals one process under Ulysses 2 (the cache holds
each rank's heads of the prefix). Ring and other attention kernels are refused (pure checks, one process). One
launch of 2 ranks.

The plain forward of the zoo cases under Ulysses 2 and 4 is in tests/test_zoo.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

from lightning_dit_parallel import parallelize, plan_for
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.sequence.head_parallel import check_head_parallel, head_parallel_modules
from tests.distributed import run_on_ranks
from tests.rank_outputs import max_relative_error
from tests.zoo import qwenimage21


def _kv_cache_run(model, inputs: dict) -> list[torch.Tensor]:
    """Three calls: prefill extracting the prefix cache, then two decode steps from it at other timesteps."""
    cache = QwenImage21KVCache(len(model.transformer_blocks))
    outputs = []
    with torch.no_grad():
        for mode, t in (("extract", 0.9), ("cached", 0.6), ("cached", 0.3)):
            given = dict(inputs, timestep=torch.tensor([t, t]), kv_cache=cache, kv_cache_mode=mode)
            outputs.append(model(**given)[0])
    return outputs


def _run(rank: int, world: int) -> dict[str, float]:
    case = qwenimage21.CASES[0]  # 21 joint tokens, a condition image, a padded prompt
    model = case.build()
    inputs = case.inputs(model)
    references = _kv_cache_run(model, inputs)
    layout = ParallelLayout(ulysses=world).resolve(world)
    handle = parallelize(model, layout, layout.build_mesh("cpu"))
    try:
        outputs = _kv_cache_run(model, inputs)
    finally:
        handle.remove()
    return {f"call {i}": max_relative_error(out, ref) for i, (out, ref) in enumerate(zip(outputs, references))}


def test_prefix_kv_cache_under_ulysses_equals_one_process():
    results = run_on_ranks(2, _run, timeout_s=300)
    failures = [f"rank {r} {k}: {v:.2e}" for r, errs in enumerate(results) for k, v in errs.items() if not v <= 1e-5]
    assert len(results[0]) == 3, results
    assert not failures, failures


def test_ring_and_other_kernels_are_refused():
    """Ring (and USP) and patch pipelines raise at setup, with what to use instead; heads must split over Ulysses."""
    model = qwenimage21.build()
    plan = plan_for(model)
    modules = head_parallel_modules(plan, model)
    assert [p for p, _, _ in modules] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    name = type(model).__name__
    usp = SimpleNamespace(ring_size=2, ulysses_size=2, size=4)
    with pytest.raises(ValueError, match="ring_degree=2 cannot run it exactly. Use ulysses_degree=4, ring_degree=1"):
        check_head_parallel(plan, modules, usp, False, name)
    ulysses = SimpleNamespace(ring_size=1, ulysses_size=2, size=2)
    with pytest.raises(ValueError, match="PipeFusion, DistriFusion"):
        check_head_parallel(plan, modules, ulysses, True, name)
    check_head_parallel(plan, modules, ulysses, False, name)
    with pytest.raises(ValueError, match="4 attention heads cannot be split over ulysses_degree=8"):
        check_head_parallel(plan, modules, SimpleNamespace(ring_size=1, ulysses_size=8, size=8), False, name)


def test_the_planner_lists_ulysses_and_no_ring():
    from lightning_dit_parallel import plan_layouts

    plan = plan_layouts(qwenimage21.build(), devices=4, tokens=1024, sequences={"joint": 1024})
    degrees = {(e.layout.ring, e.layout.ulysses, e.layout.distrifusion) for e in plan.layouts}
    assert (1, 4, 1) in degrees and (1, 2, 1) in degrees
    assert all(ring == 1 and distri == 1 for ring, _, distri in degrees), degrees
