"""A parallelized transformer under ``torch.compile`` stays exact: the whole model compiled after ``parallelize``, and
regional compilation (``parallelize(..., compile=...)``, the strategies' ``compile`` option: each plan block compiled).

One 4-rank launch: tiny Flux (15 image tokens: padded shards; diffusers' dispatcher route) under Ulysses (4) with the
``native`` backend, whole model compiled, and under Ring (4) with ``flex`` (its log-sum-exp), regionally compiled; and a
DiT that calls ``F.scaled_dot_product_attention`` itself (9 tokens) under USP (2 x 2), whole model compiled. Each
compiled model, called twice (the second call runs the cached graphs), must equal the one-process eager output
(float32, relative 1e-5) on every rank. The backend is ``aot_eager`` (dynamo + AOTAutograd,
no code generation): inductor compiles here too but needs minutes of C++ compilation per layout on two CPU cores;
``LDP_COMPILE_BACKEND=inductor`` runs this test with it.
"""

from __future__ import annotations

import os

import pytest
import torch

from lightning_dit_parallel import ParallelLayout, SequenceParallelStrategy, parallelize, plan_for
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from tests.backend_cases import layout_groups
from tests.distributed import run_on_ranks
from tests.models import build_dit
from tests.rank_outputs import max_relative_error
from tests.zoo import flux

BACKEND = os.environ.get("LDP_COMPILE_BACKEND", "aot_eager")


def _compiled(rank: int, world: int, backend: str) -> dict[str, float]:
    case = flux.CASES[1]  # flux-15img-3txt
    errors = {}
    for layout, ulysses, attention, how in (
        ("ulysses4", 4, "native", "whole"),
        ("ring4", 1, "flex", "regional"),
    ):
        torch._dynamo.reset()
        model = case.build()
        model.set_attention_backend(attention)
        with torch.no_grad():
            reference = case.output(model(**case.inputs(model)))
            if how == "whole":  # torch.compile(transformer) after parallelizing it
                handle = apply_sequence_parallel(model, plan_for(model), layout_groups(rank, world, ulysses))
                runner = torch.compile(model, backend=backend)
            else:  # parallelize(..., compile=backend): each block of the plan compiled
                layout = ParallelLayout(ulysses=ulysses, ring=world // ulysses).resolve(world)
                handle = parallelize(model, layout, layout.build_mesh("cpu"), check_inputs=False, compile=backend)
                assert all(b._compiled_call_impl is not None for b in model.transformer_blocks)
                runner = model
            try:
                for step in range(2):  # the second call runs the cached graphs
                    errors[f"{layout}/{how}/{step}"] = max_relative_error(
                        case.output(runner(**case.inputs(model))), reference
                    )
            finally:
                handle.remove()
            if how == "regional":
                assert all(b._compiled_call_impl is None for b in model.transformer_blocks)
    torch._dynamo.reset()  # a model that calls F.scaled_dot_product_attention itself (the thread-local SDPA route)
    dit = build_dit(sample_size=6)
    dit_inputs = dict(
        hidden_states=torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)),
        timestep=torch.tensor([1, 1]),
        class_labels=torch.tensor([1, 2]),
    )  # 9 tokens: padded shards
    with torch.no_grad():
        reference = dit(**dit_inputs).sample
        handle = apply_sequence_parallel(dit, plan_for(dit), layout_groups(rank, world, 2))
        runner = torch.compile(dit, backend=backend)
        for step in range(2):
            errors[f"dit-usp2x2/whole/{step}"] = max_relative_error(runner(**dit_inputs).sample, reference)
        handle.remove()
    return errors


def test_compiled_parallel_transformer_is_exact():
    results = run_on_ranks(4, _compiled, BACKEND, timeout_s=900)
    problems = [
        f"rank {r} {k}: {e:.2e}" for r, errors in enumerate(results) for k, e in errors.items() if not e <= 1e-5
    ]
    assert not problems, "\n".join(problems)
    assert len(results[0]) == 6


def test_compile_and_lse_fallback_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="compile must be"):
        SequenceParallelStrategy(ulysses_degree=2, compile=3)
    with pytest.raises(ValueError, match="lse_fallback must be"):
        SequenceParallelStrategy(ring_degree=2, lse_fallback="ignore")
    strategy = SequenceParallelStrategy(ring_degree=2, compile=True, lse_fallback="error")
    assert strategy._compile is True and strategy._lse_fallback == "error"
