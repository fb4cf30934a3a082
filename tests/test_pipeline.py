"""Pipeline parallelism: stage sharding, exact micro-batch pipelining, PipeFusion, and its errors.

Exact methods are compared with the one-process output of the same seeded model (float32, relative 1e-5)
on every rank. The models here have more blocks than ``tests.models`` builds (4 stages need >= 4 blocks),
and Flux has two block lists so that stage boundaries fall inside a list and between the two lists.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel
from lightning.pytorch.strategies import StrategyRegistry

from lightning_dit_parallel import DiTParallelStrategy, PipelineStrategy, Split, plan_for
from lightning_dit_parallel.parallel.pipeline import PipelineOptions, apply_pipeline
from lightning_dit_parallel.parallel.pipeline.patches import PatchPass, patch_bounds
from lightning_dit_parallel.parallel.pipeline.pipefusion import check_pipefusion_plan
from lightning_dit_parallel.parallel.pipeline.stages import (
    ReleasedBlock,
    assign_stages,
    check_cuts_on_every_stage,
    count_parameters,
    stage_sizes,
)
from tests.distributed import run_on_ranks
from tests.models import (
    POOLED_DIM,
    TEXT_DIM,
    build_dit,
    build_pixart,
    build_wan,
    dit_sampler,
    flux_sampler,
    pixart_sampler,
    randomize_zero_init,
    requests,
    sharpen_attention,
    text_requests,
)
from tests.rank_outputs import assert_exact, max_relative_error, predict_on_ranks, predict_single


def dit(layers: int = 4) -> DiTTransformer2DModel:
    return build_dit(layers=layers)


def pixart(layers: int = 4) -> PixArtTransformer2DModel:
    return build_pixart(layers=layers)


def flux(double: int = 2, single: int = 3, seed: int = 0) -> FluxTransformer2DModel:
    """2 double-stream + 3 single-stream blocks: 2 stages cut inside the single list, 4 stages also between lists."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


FAMILIES = {
    "dit": (lambda: dit_sampler(dit()), lambda: requests(n=2, batch_size=2)),
    "pixart": (lambda: pixart_sampler(pixart()), lambda: requests(n=2, batch_size=2)),
    "flux": (lambda: flux_sampler(flux()), lambda: text_requests(n=2, batch_size=2)),
}


# -- micro-batch pipelining: exact -----------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("stages", [2, 4])
def test_microbatch_equals_one_process(family, stages, tmp_path):
    sampler, loader = FAMILIES[family]
    ref = predict_single(sampler(), loader())
    strategy = PipelineStrategy(pp_degree=stages, mode="microbatch", start_method="fork")
    assert_exact(predict_on_ranks(sampler(), loader(), strategy, stages, tmp_path), ref)


@pytest.mark.parametrize("sequence", [dict(ulysses_degree=2), dict(ring_degree=2)])
def test_microbatch_with_sequence_parallel_flux(sequence, tmp_path):
    """pp 2 x Ulysses 2 / Ring 2 for Flux, whose plan cuts forward arguments (latents, text, position ids).
    The text position ids (7, 3), cut to (4, 3), have as many rows as the doubled batch: they must go whole."""
    ref = predict_single(flux_sampler(flux()), text_requests(n=2, batch_size=2))
    strategy = DiTParallelStrategy(pp_degree=2, start_method="fork", **sequence)
    assert_exact(predict_on_ranks(flux_sampler(flux()), text_requests(n=2, batch_size=2), strategy, 4, tmp_path), ref)


def test_microbatch_uneven_microbatches_and_stages(tmp_path):
    """3 micro-batches of a 4-row (doubled) batch, and stages of 1 and 3 blocks."""
    ref = predict_single(dit_sampler(dit()), requests(n=2, batch_size=2))
    strategy = PipelineStrategy(pp_degree=2, num_microbatches=3, layers_per_stage=[1, 3], start_method="fork")
    assert_exact(predict_on_ranks(dit_sampler(dit()), requests(n=2, batch_size=2), strategy, 2, tmp_path), ref)


# -- PipeFusion ------------------------------------------------------------------------------------------


def test_pipefusion_all_warmup_is_exact_and_resets_per_batch(tmp_path):
    """With warm-up = steps nothing is patched, so the output is exact, for each of two batches (which
    holds only if the step count and caches are reset at each new batch)."""
    ref = predict_single(dit_sampler(dit(), steps=3), requests(n=4, batch_size=2))
    strategy = PipelineStrategy(pp_degree=2, mode="pipefusion", num_patches=4, warmup_steps=3, start_method="fork")
    outs = predict_on_ranks(dit_sampler(dit(), steps=3), requests(n=4, batch_size=2), strategy, 2, tmp_path)
    assert_exact(outs, ref)


def test_pipefusion_with_cfg_parallel_all_warmup_is_exact(tmp_path):
    """cfg 2 x pp 2: each CFG half runs its own PipeFusion pipeline (and its own caches)."""
    ref = predict_single(dit_sampler(dit(), steps=3), requests(n=2, batch_size=2))
    strategy = DiTParallelStrategy(
        cfg_degree=2, pp_degree=2, pp_mode="pipefusion", num_patches=4, warmup_steps=3, start_method="fork"
    )
    assert_exact(predict_on_ranks(dit_sampler(dit(), steps=3), requests(n=2, batch_size=2), strategy, 4, tmp_path), ref)


@pytest.mark.parametrize("fsdp", [False, True])
def test_pipefusion_with_data_parallel_all_warmup_is_exact(fsdp, tmp_path):
    """dp 2 x pp 2 (with FSDP over dp): each data-parallel group pipelines its own samples."""
    ref = predict_single(dit_sampler(dit(), steps=3), requests(n=4, batch_size=2))
    strategy = DiTParallelStrategy(
        dp_degree=2, pp_degree=2, fsdp=fsdp, pp_mode="pipefusion", num_patches=2, warmup_steps=3, start_method="fork"
    )
    outs = predict_on_ranks(dit_sampler(dit(), steps=3), requests(n=4, batch_size=2), strategy, 4, tmp_path)
    # the distributed sampler gives dp group 0 the requests 0 and 2, group 1 the requests 1 and 3
    groups = {0: [0, 2], 1: [0, 2], 2: [1, 3], 3: [1, 3]}
    for rank in range(4):
        assert_exact([outs[rank]], ref[groups[rank]])


@pytest.mark.parametrize(("stages", "steps", "patches"), [(2, 8, 4), (4, 3, 2)])
def test_pipefusion_runs_and_stays_close(stages, steps, patches, tmp_path):
    """More steps than stages and the reverse; stale keys/values change the output a little, not a lot."""
    ref = predict_single(pixart_sampler(pixart(), steps=steps), requests(n=2, batch_size=2))
    strategy = PipelineStrategy(
        pp_degree=stages, mode="pipefusion", num_patches=patches, warmup_steps=1, start_method="fork"
    )
    sampler = pixart_sampler(pixart(), steps=steps)
    outs = predict_on_ranks(sampler, requests(n=2, batch_size=2), strategy, stages, tmp_path)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)  # every rank returns the same result
    deviation = (outs[0] - ref).abs()
    scale = ref.abs().max().item()
    assert deviation.max().item() > 1e-5 * scale, "PipeFusion after warm-up should differ from the exact run"
    # Seeded run: about 3% (2 stages, 8 steps) and 2% (4 stages, 3 steps) mean deviation with one warm-up step;
    # attending to the current step's patches only (no warm-up) gives 5% and 3%.
    assert deviation.mean().item() < 0.04 * ref.abs().mean().item(), (deviation.mean().item(), ref.abs().mean().item())
    assert deviation.max().item() < 0.3 * scale, (deviation.max().item(), scale)


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_pipefusion_with_tensor_parallel_equals_pipefusion_alone(family, tmp_path):
    """pp 2 x tp 2: tensor parallelism is exact, so PipeFusion's patched steps (stale keys and values, one warm-up
    step) give what PipeFusion on 2 stages alone gives (measured 1.3e-6 relative on PixArt), and not the exact output.
    Flux: joint attention, the text cut per step."""
    make, batches = FAMILIES[family]
    options = dict(pp_degree=2, mode="pipefusion", num_patches=4, warmup_steps=1, start_method="fork")
    alone = predict_on_ranks(make(), batches(), PipelineStrategy(**options), 2, tmp_path / "pp")
    with_tp = predict_on_ranks(make(), batches(), PipelineStrategy(**options, tp_degree=2), 4, tmp_path / "tp")
    assert_exact(with_tp, alone[0], f"{family} pipefusion pp2 x tp2")
    assert max_relative_error(alone[0], predict_single(make(), batches())) > 1e-4  # the patched steps did run


def _pipefusion_first_step_differs(rank: int, world_size: int) -> float:
    model, x, t, c = dit(), *_dit_inputs()
    with torch.no_grad():
        exact = model(x, timestep=t, class_labels=c, return_dict=False)[0]
        options = PipelineOptions("pipefusion", num_patches=4, warmup_steps=0)
        apply_pipeline(model, plan_for(model), options, dist.group.WORLD)
        patched = model(x, timestep=t, class_labels=c, return_dict=False)[0]
    return (patched - exact).abs().max().item()


def test_pipefusion_without_warmup_attends_to_computed_patches_only():
    """Without warm-up the first step has no stale keys: patch i sees patches 0..i of this step, so it differs."""
    for deviation in run_on_ranks(2, _pipefusion_first_step_differs, timeout_s=60):
        assert deviation > 1e-3


# -- stage sharding: memory ------------------------------------------------------------------------------


def _held_parameters(rank: int, world_size: int, layers: int) -> dict:
    model = dit(layers)
    blocks = model.transformer_blocks
    block_params = [count_parameters(b) for b in blocks]
    shared = count_parameters(blocks[0].norm1.emb)
    total = count_parameters(model)
    pp = apply_pipeline(model, plan_for(model), PipelineOptions(), dist.group.WORLD)
    owned = [i for i in range(layers) if not isinstance(model.transformer_blocks[i], ReleasedBlock)]
    return {
        "held": count_parameters(model),
        "total": total,
        "blocks": sum(block_params),
        "owned": owned,
        "owned_params": sum(block_params[i] for i in owned),
        "shared": shared,
        "released": len(pp.released),
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_holds_its_stage_only(world_size):
    layers = 8
    results = run_on_ranks(world_size, _held_parameters, layers, timeout_s=60)
    owned = [i for r in results for i in r["owned"]]
    assert owned == list(range(layers)), "every block is held by exactly one rank, in stage order"
    for rank, r in enumerate(results):
        outside_blocks = r["total"] - r["blocks"]
        assert r["released"] == layers - layers // world_size
        assert r["owned_params"] == r["blocks"] // world_size
        # Its blocks, the embedding and final layers, and (not owning block 0) the timestep/class embedding the
        # DiT's final layer borrows from block 0 (the plan's shared_modules).
        expected = r["owned_params"] + outside_blocks + (r["shared"] if 0 not in r["owned"] else 0)
        assert r["held"] == expected, (rank, r)
        assert r["held"] <= r["blocks"] / world_size + outside_blocks + r["shared"]


def test_stage_sizes():
    assert stage_sizes(28, 2) == [14, 14]
    assert stage_sizes(5, 4) == [2, 1, 1, 1]
    assert stage_sizes(4, 2, (1, 3)) == [1, 3]


def test_patch_parts():
    """Patches are contiguous runs, the first ones a token longer; unpatched sequences go whole with every pass."""
    assert patch_bounds(16, 3) == [0, 6, 11, 16] and patch_bounds(8, 4) == [0, 2, 4, 6, 8]
    patch = PatchPass(3, 1, patched=frozenset({"image"}))
    image = patch.cut(torch.arange(16)[None], Split("image", 1), "test")  # (1, 16) -> (1, 5)
    text = patch.cut(torch.arange(7)[None], Split("text", 1), "test")  # (1, 7) whole
    assert image.tolist() == [[6, 7, 8, 9, 10]] and text.shape == (1, 7)
    assert patch.part("image") == (6, 5) and patch.parts("image") == [6, 5, 5] and patch.parts("text") == [7]
    with pytest.raises(ValueError, match="but 16 were cut earlier in this pass"):
        patch.cut(torch.arange(15)[None], Split("image", 1), "test")


# -- errors: same ValueError on every rank before any communication ----------------------------------------


def _dit_inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(4, 4, 8, 8, generator=generator), torch.tensor([5, 5, 7, 7]), torch.tensor([1, 2, 3, 9])


def _apply_error(rank: int, world_size: int, layers: int, options: PipelineOptions) -> str:
    model = dit(layers)
    with pytest.raises(ValueError) as info:
        apply_pipeline(model, plan_for(model), options, dist.group.WORLD)
    assert not any(isinstance(b, ReleasedBlock) for b in model.transformer_blocks._modules.values()), "nothing released"
    return str(info.value)


def _forward_error(rank: int, world_size: int, patches: int) -> str:
    model, x, t, c = dit(), *_dit_inputs()
    options = PipelineOptions("pipefusion", num_patches=patches, warmup_steps=0)
    apply_pipeline(model, plan_for(model), options, dist.group.WORLD)
    with pytest.raises(ValueError) as info, torch.no_grad():
        model(x, timestep=t, class_labels=c, return_dict=False)
    return str(info.value)


def _unknown_module_input(rank: int, world_size: int) -> str:
    model = dit()
    plan = dataclasses.replace(plan_for(model), split_module_inputs={"proj_in": {"x": Split("image", 1)}})
    with pytest.raises(ValueError) as info:
        apply_pipeline(model, plan, PipelineOptions(), dist.group.WORLD)
    assert not any(isinstance(b, ReleasedBlock) for b in model.transformer_blocks._modules.values()), "nothing released"
    return str(info.value)


def test_plan_paths_are_checked_before_anything_is_released():
    for message in run_on_ranks(2, _unknown_module_input, timeout_s=60):
        assert "Plan module paths ['proj_in'] do not exist in DiTTransformer2DModel" in message


def test_more_stages_than_blocks():
    messages = run_on_ranks(4, _apply_error, 2, PipelineOptions(), timeout_s=60)
    for message in messages:
        assert "2 transformer blocks into 4 pipeline stages" in message


def test_layers_per_stage_must_sum_to_blocks():
    messages = run_on_ranks(2, _apply_error, 4, PipelineOptions(layers_per_stage=(1, 2)), timeout_s=60)
    for message in messages:
        assert "layers_per_stage=[1, 2]" in message and "4 blocks" in message and "sum to 3" in message


def test_patches_need_a_token_each():
    """Patches need not divide the token count (the first take one more; exact after warm-up in test_patch_zoo), but
    each needs a token: 17 patches of 16 tokens is an error on every rank."""
    messages = run_on_ranks(2, _forward_error, 17, timeout_s=60)  # 16 image tokens, 17 patches
    for message in messages:
        assert "16 tokens" in message and "num_patches=17" in message and "num_patches <= 16" in message


def test_strategy_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match=r"layers_per_stage has 3 entries \[1, 2, 3\] but there are 2"):
        PipelineStrategy(pp_degree=2, layers_per_stage=[1, 2, 3])
    with pytest.raises(ValueError, match="mode must be 'microbatch' or 'pipefusion'; got 'gpipe'"):
        PipelineStrategy(pp_degree=2, mode="gpipe")
    with pytest.raises(ValueError, match="num_patches must be a positive integer or None; got 0"):
        PipelineStrategy(pp_degree=2, mode="pipefusion", num_patches=0)
    # options of the other mode, or without pipeline stages, would be ignored: rejected instead
    with pytest.raises(ValueError, match="num_patches is a PipeFusion option, but mode='microbatch'"):
        PipelineStrategy(pp_degree=2, num_patches=4)
    with pytest.raises(ValueError, match="num_microbatches is a micro-batch option, but mode='pipefusion'"):
        PipelineStrategy(pp_degree=2, mode="pipefusion", num_microbatches=2)
    with pytest.raises(ValueError, match="Pipeline options need pp_degree > 1; got pp_degree=1 with mode=pipefusion"):
        DiTParallelStrategy(ulysses_degree=2, pp_mode="pipefusion")


def test_registered_names():
    for name, mode in (("dit_pipeline", "microbatch"), ("dit_pipefusion", "pipefusion")):
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, PipelineStrategy) and strategy._pipeline.mode == mode
        assert strategy._requested_layout.pp == "auto" and strategy._requested_layout.dp == 1


def test_pipefusion_plan_checks():
    """Joint attention (Flux) and cuts at a block's inputs (Wan) are PipeFusion plans now; attention to a replicated
    tail (Mochi) is not, and is named in the error."""
    for model in (flux(), build_wan()):
        check_pipefusion_plan(plan_for(model), model)
    from tests.zoo.mochi import CASES

    mochi = CASES[0].build()
    with pytest.raises(ValueError, match=r"\['replicated_tail_attention'\].*microbatch"):
        check_pipefusion_plan(plan_for(mochi), mochi)


def test_every_stage_must_cut_at_a_block_input():
    """A plan that cuts tokens at the first block of a list needs every stage to own a block of that list from there
    on: with one double- and one single-stream block, stage 1 of 2 owns none (HunyuanVideo's text)."""
    from tests.zoo.hunyuan_video import CASES

    model = CASES[0].build()
    assignment = assign_stages(model, plan_for(model), 2)
    with pytest.raises(ValueError, match=r"cuts tokens at the inputs of 'transformer_blocks.0', but stage 1/2 owns"):
        check_cuts_on_every_stage(model, plan_for(model), assignment, "PipeFusion (pp=2)")
    check_cuts_on_every_stage(model, plan_for(model), assign_stages(model, plan_for(model), 1), "one stage")
