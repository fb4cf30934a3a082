"""Ulysses, Ring and USP through ``Trainer.predict`` for every diffusers DiT family with a shipped plan.

Each case is a small seeded model with sharpened attention inside the ``DiffusionSampler`` (scheduler loop with
classifier-free guidance). Every layout on 2 and 4 ranks must give the one-process output (float32, relative
1e-5) on every rank, including token counts (image/video and text) that do not divide the degree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_dit_parallel import DiTPlan, SequenceParallelStrategy, Split, plan_for, register_plan, unregister_plan
from lightning_dit_parallel.app.sampling import DiffusionSampler
from lightning_dit_parallel.parallel.compose import parallelize
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from tests.distributed import run_on_ranks
from tests.models import (
    build_cogvideox,
    build_dit,
    build_flux,
    build_pixart,
    build_sd3,
    build_wan,
    cogvideox_sampler,
    dit_sampler,
    flux_sampler,
    pixart_sampler,
    requests,
    sd3_sampler,
    text_requests,
    wan_sampler,
)
from tests.rank_outputs import assert_exact, max_relative_error, predict_on_ranks, predict_single


@dataclass(frozen=True)
class Case:
    """One family at one size; ``module()`` builds a fresh seeded sampler, ``loader()`` the requests."""

    name: str
    module: Callable[[], DiffusionSampler]
    loader: Callable[[], DataLoader]


CASES = [
    # DiT / PixArt: (size/2)**2 image tokens; PixArt's text is cross-attention context (not split).
    Case("dit-16img", lambda: dit_sampler(build_dit(8)), lambda: requests()),
    Case("dit-25img", lambda: dit_sampler(build_dit(10)), lambda: requests()),
    Case("pixart-25img", lambda: pixart_sampler(build_pixart(10)), lambda: requests(text_tokens=7)),
    # SD3: joint attention over image then text; both sequences split.
    Case("sd3-16img-8txt", lambda: sd3_sampler(build_sd3(), size=8), lambda: text_requests(text_tokens=8)),
    Case("sd3-25img-7txt", lambda: sd3_sampler(build_sd3(), size=10), lambda: text_requests(text_tokens=7)),
    # Flux: packed token grid height x width, text first; 3 text tokens leave the 4th rank a text shard of padding.
    Case("flux-16img-8txt", lambda: flux_sampler(build_flux(), 4, 4), lambda: text_requests(text_tokens=8)),
    Case("flux-15img-3txt", lambda: flux_sampler(build_flux(), 3, 5), lambda: text_requests(text_tokens=3)),
    # Wan: frames * (size/2)**2 video tokens with 3-D rotary; text is cross-attention context.
    Case("wan-18vid", lambda: wan_sampler(build_wan(), frames=2, size=6), lambda: text_requests(text_tokens=7)),
    Case("wan-27vid", lambda: wan_sampler(build_wan(), frames=3, size=6), lambda: text_requests(text_tokens=7)),
    # CogVideoX: cat([text, video]) attention with rotary on the video tokens.
    Case(
        "cogvideox-32vid-8txt",
        lambda: cogvideox_sampler(build_cogvideox(), frames=2, size=8),
        lambda: text_requests(text_tokens=8),
    ),
    Case(
        "cogvideox-27vid-7txt",
        lambda: cogvideox_sampler(build_cogvideox(), frames=3, size=6),
        lambda: text_requests(text_tokens=7),
    ),
    # CogVideoX-2b style: sine-cosine positions added to the whole sequence before it is cut.
    Case(
        "cogvideox-sincos-27vid-7txt",
        lambda: cogvideox_sampler(build_cogvideox(rotary=False, text_tokens=7), frames=3, size=6),
        lambda: text_requests(text_tokens=7),
    ),
]

#: (devices, degrees): Ulysses, Ring on 2 ranks; Ulysses, Ring, USP on 4 ranks.
LAYOUTS = {
    "ulysses2": (2, dict(ulysses_degree=2)),
    "ring2": (2, dict(ring_degree=2)),
    "ulysses4": (4, dict(ulysses_degree=4)),
    "ring4": (4, dict(ring_degree=4)),
    "usp2x2": (4, dict(ulysses_degree=2, ring_degree=2)),
}


@pytest.fixture(scope="module")
def references() -> Callable[[Case], torch.Tensor]:
    """The one-process output of each case, computed once per module."""
    cache: dict[str, torch.Tensor] = {}

    def get(case: Case) -> torch.Tensor:
        if case.name not in cache:
            cache[case.name] = predict_single(case.module(), case.loader())
        return cache[case.name]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sequence_parallel_equals_one_process(case: Case, layout: str, references, tmp_path: Path, record_property):
    devices, degrees = LAYOUTS[layout]
    reference = references(case)
    strategy = SequenceParallelStrategy(**degrees, start_method="fork")
    outputs = predict_on_ranks(case.module(), case.loader(), strategy, devices, tmp_path)
    assert len(outputs) == devices
    record_property("max_relative_error", assert_exact(outputs, reference, f"{case.name} {layout}"))


def test_declared_concatenation_order_matters(references, tmp_path: Path):
    """Negative control: Flux's processor puts text first; a plan that declares image first masks the wrong keys
    when tokens are padded, and the comparison above catches it."""
    case = next(c for c in CASES if c.name == "flux-15img-3txt")
    model = case.module()
    plan = plan_for(model.transformer)
    swapped = {pattern: tuple(reversed(order)) for pattern, order in plan.self_attention.items()}
    wrong = DiTPlan(
        split_inputs=plan.split_inputs, gather_outputs=plan.gather_outputs, blocks=plan.blocks, self_attention=swapped
    )
    cls = type(model.transformer)
    register_plan(cls, wrong)
    try:
        strategy = SequenceParallelStrategy(ulysses_degree=4, start_method="fork")
        outputs = predict_on_ranks(model, case.loader(), strategy, 4, tmp_path)
    finally:
        unregister_plan(cls)
    errors = [max_relative_error(out, references(case)) for out in outputs]
    assert min(errors) > 1e-2, f"a wrong concatenation order went unnoticed: errors {errors}"


# -- one rank, no process group: every plan's hooks run and change nothing ------------------------------------


PADDED_CASES = ("dit-25img", "pixart-25img", "sd3-25img-7txt", "flux-15img-3txt", "wan-27vid", "cogvideox-27vid-7txt")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in PADDED_CASES], ids=lambda c: c.name)
def test_plan_hooks_on_one_rank_change_nothing(case: Case):
    """With one sequence-parallel rank every split, gather and attention check of the plan runs (a path, argument
    or concatenation length the model does not have fails here) and the output is bit-identical."""
    module = case.module()
    batch = next(iter(case.loader()))
    reference = module.sample(batch)
    handle = apply_sequence_parallel(module.transformer, plan_for(module.transformer), SequenceGroups())
    try:
        output = module.sample(batch)
    finally:
        handle.remove()
    assert torch.equal(output, reference)


def test_split_module_inputs_are_checked_against_the_model():
    model = build_wan()
    base = plan_for(model)
    with pytest.raises(ValueError, match="split_inputs"):
        DiTPlan(
            split_module_inputs={"": {"x": Split("video", 1)}},
            gather_outputs=base.gather_outputs,
            self_attention=base.self_attention,
        )
    for module_inputs, match in [
        ({"blocks.0": {"hidden": Split("video", 1)}}, r"\['hidden'\] are not arguments of WanTransformerBlock"),
        ({"blocks.9": {"hidden_states": Split("video", 1)}}, r"\['blocks.9'\] do not exist"),
    ]:
        plan = DiTPlan(
            split_module_inputs=module_inputs,
            split_outputs=base.split_outputs,
            gather_outputs=base.gather_outputs,
            self_attention=base.self_attention,
        )
        with pytest.raises(ValueError, match=match):
            apply_sequence_parallel(model, plan, SequenceGroups())


def test_tuple_split_of_the_wrong_arity_is_an_error():
    module = wan_sampler(build_wan())
    base = plan_for(module.transformer)
    plan = DiTPlan(
        split_outputs={"rope": (Split("video", 1),)},
        split_module_inputs=base.split_module_inputs,
        gather_outputs=base.gather_outputs,
        self_attention=base.self_attention,
    )
    handle = apply_sequence_parallel(module.transformer, plan, SequenceGroups())
    try:
        with pytest.raises(TypeError, match="rope: the plan splits a 1-tuple, got tuple"):
            module.sample(next(iter(text_requests())))
    finally:
        handle.remove()


# -- heads that do not split over the Ulysses degree -------------------------------------------------------------


def _parallelize_error(rank: int, world: int, build: Callable[[int], nn.Module], heads: int, degrees: dict) -> str:
    layout = ParallelLayout(**degrees).resolve(world)
    mesh = layout.build_mesh("cpu")
    with pytest.raises(ValueError) as info:
        parallelize(build(heads), layout, mesh)
    return str(info.value)


@pytest.mark.parametrize(
    "build, heads, world, degrees, suggestion",
    [
        (build_flux, 3, 2, dict(ulysses=2), "ulysses_degree=1, ring_degree=2"),
        (build_sd3, 6, 4, dict(ulysses=4), "ulysses_degree=2, ring_degree=2"),
        (build_wan, 3, 4, dict(ulysses=2, ring=2), "ulysses_degree=1, ring_degree=4"),
    ],
    ids=["flux", "sd3", "wan"],
)
def test_heads_not_divisible_suggest_a_ring_degree(build, heads, world, degrees, suggestion):
    messages = run_on_ranks(world, _parallelize_error, build, heads, degrees, timeout_s=60)
    for rank, message in enumerate(messages):
        assert f"{heads} attention heads cannot be split over ulysses_degree={degrees['ulysses']}" in message, (
            f"rank {rank}: {message}"
        )
        assert suggestion in message, f"rank {rank}: {message}"
