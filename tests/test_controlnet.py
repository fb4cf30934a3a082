"""ControlNet residuals (a list of ``(B, S, D)`` tensors, one per controlled block, that the DiT adds to its image
tokens inside the block loop): the plans cut every element like the image tokens (``Each``), so Ulysses, Ring, USP
and CFG parallelism equal one process (float32, relative 1e-5, token counts that do not divide the degree, sharp
attention). Pipeline stages count their blocks from their global position (``parallel/pipeline/positions.py``), so each
stage adds the residuals of its own blocks by the DiT's own rule (Flux/Chroma/Qwen-Image ``i // ceil(L/n)``, SD3
``int(i / (L/n))``, Sana ``i - 1``, Cosmos every n blocks): pp 2, pp 2 x Ulysses 2 and pp 2 x CFG 2 equal one process
too, with fewer residuals than blocks where the rule allows. Plans that do not cut residuals refuse them
(``sequence_unsupported_inputs``); HunyuanDiT (long skips) cannot be pipelined at all.

Families: Flux and Chroma (double- and single-stream residuals), SD3, Qwen-Image, Sana, Sana Video, Cosmos and
HunyuanDiT (residuals added to its long skips). One launch of 2 ranks and one of 4.
"""

from __future__ import annotations

import pytest
import torch

from lightning_dit_parallel import parallelize, plan_for
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.pipeline import PipelineOptions
from tests.distributed import run_on_ranks
from tests.models import build_sd3
from tests.rank_outputs import max_relative_error
from tests.zoo import all_cases, first_tensor, randn, seeded_model


def _per_block(blocks: str):
    """One residual per block of the list ``blocks``."""
    return lambda model: len(model.get_submodule(blocks))


def _per_long_skip(model) -> int:
    """HunyuanDiT: one residual per long skip, i.e. per block past the middle one."""
    layers = model.config.num_layers
    return layers - layers // 2 - 1


def _every_block_of_cosmos(model) -> int:
    model.register_to_config(controlnet_block_every_n=1)  # a ControlNet residual for every block
    return len(model.transformer_blocks)


def _count(n: int):
    """A fixed number of residuals (fewer than blocks: each is added to several blocks by the DiT's rule)."""
    return lambda model: n


#: zoo case -> the forward arguments that take residuals, each with how many the model reads
ZOO_CASES = {
    "chroma-15img-7txt": {
        "controlnet_block_samples": _per_block("transformer_blocks"),
        "controlnet_single_block_samples": _per_block("single_transformer_blocks"),
    },
    "qwenimage-15img-7txt": {"controlnet_block_samples": _per_block("transformer_blocks")},
    "sana-15img-7txt": {"controlnet_block_samples": _per_block("transformer_blocks")},
    "sana_video-27vid-7txt": {"controlnet_block_samples": _per_block("transformer_blocks")},
    "hunyuan_dit-15img-7txt": {"controlnet_block_samples": _per_long_skip},
}

#: deeper variants of zoo cases (config overrides), so that a pipeline stage starts inside a block list
DEEP_CASES = {
    # 3 double-stream blocks read 2 residuals (i // ceil(3/2)): stage 1 starts at double block 2, which reads the
    # second one; 3 single-stream blocks, one residual each
    "flux-15img-3txt": (
        {"num_layers": 3, "num_single_layers": 3},
        {
            "controlnet_block_samples": _count(2),
            "controlnet_single_block_samples": _per_block("single_transformer_blocks"),
        },
    ),
    # Chroma also slices its per-block modulation by the block's position
    "chroma-15img-7txt": (
        {"num_layers": 3, "num_single_layers": 2},
        {"controlnet_block_samples": _per_block("transformer_blocks"), "controlnet_single_block_samples": _count(1)},
    ),
    # a Cosmos block takes its residual as an argument, which a stage's first block receives from the previous
    # stage: only the stage's later blocks test the positions
    "cosmos-27vid-7txt-perframe-imgctx": (
        {"num_layers": 3},
        {"block_controlnet_hidden_states": _every_block_of_cosmos},
    ),
}

#: name -> (world size, degrees)
LAYOUTS = {
    "ulysses2": (2, dict(ulysses=2)),
    "ring2": (2, dict(ring=2)),
    "cfg2": (2, dict(cfg=2)),
    "pp2": (2, dict(pp=2)),
    "ulysses4": (4, dict(ulysses=4)),
    "usp2x2": (4, dict(ulysses=2, ring=2)),
    "cfg2 x ring2": (4, dict(cfg=2, ring=2)),
    "pp2 x ulysses2": (4, dict(pp=2, ulysses=2)),
    "pp2 x cfg2": (4, dict(pp=2, cfg=2)),
}

#: families whose plan cannot be cut into pipeline stages at all: (case, a layout with pp) must raise that at setup
NOT_PIPELINED = ("hunyuan_dit",)


def _sd3_inputs(model) -> dict:
    return dict(
        hidden_states=randn(1, 4, 10, 10, seed=1).repeat(2, 1, 1, 1),  # 25 image tokens after the 2x2 patches
        encoder_hidden_states=randn(2, 7, model.config.joint_attention_dim, seed=2),
        pooled_projections=randn(2, model.config.pooled_projection_dim, seed=3),
        timestep=torch.tensor([10.0, 10.0]),
        return_dict=False,
    )


def _cases() -> list[tuple[str, object, dict, dict]]:
    """(name, model, inputs without residuals, residual argument -> count(model))."""
    zoo = {c.name: c for c in all_cases()}
    cases = []
    for name, arguments in ZOO_CASES.items():
        case = zoo[name]
        model = case.build()
        cases.append((name, model, case.inputs(model), arguments))
    for name, (overrides, arguments) in DEEP_CASES.items():
        case = zoo[name]
        config = {**case.build().config, **overrides}
        model = seeded_model(lambda: type(case.build()).from_config(config))
        cases.append((f"{name}-deep", model, case.inputs(model), arguments))
    # SD3's last block is context_pre_only and takes no residual: 3 blocks, so that stage 1 runs two that do
    sd3 = seeded_model(lambda: type(build_sd3()).from_config({**build_sd3().config, "num_layers": 3}))
    cases.append(
        ("sd3-25img-7txt", sd3, _sd3_inputs(sd3), {"block_controlnet_hidden_states": _per_block("transformer_blocks")})
    )
    return cases


def _with_residuals(model, inputs: dict, arguments: dict) -> dict:
    """``inputs`` plus seeded residuals shaped like the hidden states that the first block of the plan receives,
    (B, S, D) (single-stream blocks add theirs to the image part of their tokens)."""
    shape: list[tuple[int, ...]] = []

    def capture(module, args, kwargs):
        shape.append(tuple(kwargs.get("hidden_states", args[0] if args else None).shape))  # (B, S, D)

    first_list = plan_for(model).blocks[0]
    handle = model.get_submodule(first_list)[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    given = dict(inputs)
    for index, (name, count) in enumerate(sorted(arguments.items())):
        given[name] = [0.5 * randn(*shape[0], seed=100 + 10 * index + i) for i in range(count(model))]
    return given


def _call(model, given: dict):
    """The model's prediction; residual lists are copied, as HunyuanDiT pops its own."""
    with torch.no_grad():
        return first_tensor(model(**{k: list(v) if isinstance(v, list) else v for k, v in given.items()}))


def _stages(model, layout: ParallelLayout) -> PipelineOptions | None:
    """With pp 2, stage 0 owns one block: stage 1 starts at position 1 of the first list and runs the rest, so that
    counting its blocks from 0 would read the wrong residuals."""
    if layout.pp == 1 or plan_for(model).pipeline_unsupported:
        return None
    blocks = sum(len(blocks) for _, blocks in plan_for(model).block_lists(model))
    return PipelineOptions(layers_per_stage=(1, blocks - 1))


def _run(rank: int, world: int) -> dict[str, object]:
    outcomes: dict[str, object] = {}
    for name, model, inputs, arguments in _cases():
        given = _with_residuals(model, inputs, arguments)
        reference = _call(model, given)
        for layout_name, (size, degrees) in LAYOUTS.items():
            if size != world:
                continue
            layout = ParallelLayout(**degrees).resolve(world)
            try:
                handle = parallelize(model, layout, layout.build_mesh("cpu"), pipeline=_stages(model, layout))
            except ValueError as err:  # a plan that cannot be pipelined at all (HunyuanDiT)
                outcomes[f"{name} {layout_name}"] = str(err)
                continue
            try:
                out = _call(model, given)
                outcomes[f"{name} {layout_name}"] = max_relative_error(out, reference)
            except ValueError as err:
                outcomes[f"{name} {layout_name}"] = str(err)
            finally:
                handle.remove()
    return outcomes


@pytest.mark.parametrize("world", [2, 4])
def test_controlnet_residuals_are_cut_like_the_image_tokens(world):
    results = run_on_ranks(world, _run, timeout_s=600)
    failures = []
    for rank, outcomes in enumerate(results):
        for key, outcome in outcomes.items():
            if key.startswith(NOT_PIPELINED) and " pp2" in key:
                if not (isinstance(outcome, str) and "cannot be cut into pipeline stages" in outcome):
                    failures.append(
                        f"{key}, rank {rank}: expected the pipeline_unsupported ValueError, got {outcome!r}"
                    )
            elif not (isinstance(outcome, float) and outcome <= 1e-5):
                failures.append(f"{key}, rank {rank}: {outcome!r}")
    assert results[0], "no case ran"
    assert not failures, "\n".join(failures)


def test_a_plan_that_does_not_cut_residuals_refuses_them():
    """Z-Image's plan lists its residuals (a dict by layer) as unsupported under sequence parallelism: a ValueError at
    the call, not a wrong sum; without cut tokens they are taken."""
    from lightning_dit_parallel.parallel.input_limits import refused_inputs

    plan = plan_for(next(c for c in all_cases() if c.name.startswith("z_image")).build())
    refused = refused_inputs(plan, ParallelLayout(ulysses=2).resolve(2), patched=True)
    assert "controlnet_block_samples" in refused and "does not cut" in refused["controlnet_block_samples"]
    assert not refused_inputs(plan, ParallelLayout(cfg=2).resolve(2), patched=False)


def test_global_positions_are_installed_and_removed():
    """``enumerate`` in the DiT's module counts a stage's view of a block list from its offset, anything else as the
    builtin; removing the last installation puts the module's namespace back as it was."""
    import builtins

    from lightning_dit_parallel.parallel.pipeline import positions

    model = next(c for c in all_cases() if c.name.startswith("flux")).build()
    namespace = positions.forward_namespaces(model)[0]
    assert "enumerate" not in namespace
    first, second = positions.install(model), positions.install(model)
    assert namespace["enumerate"] is positions.stage_enumerate
    blocks = model.transformer_blocks
    setattr(blocks, positions.OFFSET_ATTRIBUTE, 3)
    assert [i for i, _ in positions.stage_enumerate(blocks)] == [3]
    delattr(blocks, positions.OFFSET_ATTRIBUTE)
    assert list(positions.stage_enumerate("ab", 1)) == list(builtins.enumerate("ab", 1))
    first.remove()
    assert namespace["enumerate"] is positions.stage_enumerate  # the second installation still uses it
    second.remove()
    assert "enumerate" not in namespace
