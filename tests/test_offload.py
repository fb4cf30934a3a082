"""Host offload (``offload=True``): the weights of the blocks and encoder layers stay in host memory and are brought to
the device per unit. On CPU host and device are one memory, so the forward must be the plain one: every case equals
one process (float32, relative 1e-5) on 2 gloo ranks, for tiny PixArt-Sigma and Wan pipelines held as ``self.pipe``,
with FSDP (``CPUOffloadPolicy`` on the shards), pipeline stages, Ulysses alone and pipeline stages with the encoders
kept whole (``offload.apply_offload`` hooks). Each predict must really install the offload (counted from inside
``predict_step``) and leave the plain module behind. The planner offers offload only when nothing fits without it;
``offload=True`` is refused where there is nothing to offload. On CUDA the device peak with offload stays below the
model's size.
"""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch
from torch import nn
from torch.distributed import _composable_state
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

from lightning_dit_parallel import (
    DiTParallelStrategy,
    FSDPInferenceStrategy,
    PipelineStrategy,
    SequenceParallelStrategy,
    TensorParallelStrategy,
    plan_for,
)
from lightning_dit_parallel.app.prompts import prompt_loader
from lightning_dit_parallel.parallel.compose import parallelize
from lightning_dit_parallel.parallel.fsdp import encoder_units, is_sharded, weight_layers
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.offload import apply_offload
from lightning_dit_parallel.parallel.pipeline.stages import ReleasedBlock
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.pipelines import PIXART_CALL, WAN_CALL, pixart_sigma_pipeline, wan_pipeline

PROMPTS = ["a red cat", "a blue dog on the grass"]


def offload_counts(module: nn.Module) -> dict[str, int]:
    """Units offloaded right now: streamed by ``offload.apply_offload`` (their ``_apply`` is overridden) and FSDP units
    whose shards live on the host (``CPUOffloadPolicy``)."""
    streamed = sum("_apply" in m.__dict__ for m in module.modules())
    fsdp = 0
    for m in module.modules():
        if isinstance(m, FSDPModule) and any(
            isinstance(g.offload_policy, CPUOffloadPolicy) for g in m._get_fsdp_state()._fsdp_param_groups
        ):
            fsdp += 1
    return {"streamed": streamed, "fsdp": fsdp}


class HoldsPipeline(L.LightningModule):
    """``self.pipe`` is the only attribute; ``predict_step`` records what is offloaded while it runs."""

    def __init__(self, make, call: dict, output: str) -> None:
        super().__init__()
        self.pipe = make()
        self.pipe.set_progress_bar_config(disable=True)
        self.call, self.output = call, output
        self.seen: dict[str, int] = {}

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen = offload_counts(self)
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return getattr(self.pipe(prompt=list(batch["prompt"]), generator=generators, **self.call), self.output)


FAMILIES = {
    "pixart": lambda: HoldsPipeline(pixart_sigma_pipeline, PIXART_CALL, "images"),
    "wan": lambda: HoldsPipeline(wan_pipeline, WAN_CALL, "frames"),
}

#: name -> (strategy, what must be offloaded while predict runs: units streamed, the DiT's FSDP units offloaded
#: (``"blocks"``: each block and each of the root's weight layers; ``"layers"``: each block's rest and every weight
#: layer, the units of ``fsdp_units="rows"`` too), and whether the encoder's FSDP units - every one but its root, see
#: ``fsdp.encoder_units`` - are offloaded too). Both DiTs have 2 blocks, both encoders 2 layers.
CASES = {
    # FSDP shards of the DiT's blocks and of the encoder's layers on the host (the roots' shards stay on the device)
    "fsdp_ulysses2": (
        lambda: FSDPInferenceStrategy(ulysses_degree=2, offload=True, fsdp_units="blocks"),
        (0, "blocks", True),
    ),
    # data parallel FSDP (the default units: rows streaming): each rank its own sample, from host-offloaded shards
    "fsdp_dp2": (lambda: FSDPInferenceStrategy(offload=True), (0, "layers", True)),
    # pipeline stages: the stage's one block streamed; the encoder sharded over the stages with offloaded shards
    "pipeline2": (lambda: PipelineStrategy(pp_degree=2, offload=True), (1, None, True)),
    # pipeline stages with the encoder kept whole: its layers streamed too
    "pipeline2_whole_encoder": (
        lambda: PipelineStrategy(pp_degree=2, offload=True, shard_modules=[]),
        (3, None, False),
    ),
    # tensor parallelism: both blocks' DTensor shards streamed; the encoder sharded over the tp ranks, offloaded
    "tp2": (lambda: TensorParallelStrategy(tp_degree=2, offload=True), (2, None, True)),
    # no FSDP, no stages: every block and layer streamed
    "ulysses2": (lambda: SequenceParallelStrategy(ulysses_degree=2, offload=True), (4, None, False)),
}


def _plain_state(module: nn.Module) -> list[str]:
    problems = []
    for name, m in module.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            problems.append(f"{name}: hooks")
        if m in _composable_state._module_state_mapping:
            problems.append(f"{name}: FSDP state")
        if isinstance(m, ReleasedBlock):
            problems.append(f"{name}: released")
        if "_apply" in m.__dict__:
            problems.append(f"{name}: _apply overridden")
    problems += [f"{n}: sharded" for n, p in module.named_parameters() if is_sharded(p) or p.is_meta]
    problems += [f"{n}: not on the CPU" for n, p in module.named_parameters() if p.device.type != "cpu"]
    return problems


def _every_case(rank: int, world: int, family: str, ports: tuple[int, int]) -> list[str]:
    module = FAMILIES[family]()
    loader = prompt_loader(PROMPTS, batch_size=2)
    batch = next(iter(loader))
    with torch.no_grad():
        reference = module.predict_step(batch, 0)  # the one-process output, before any strategy
    failures = []
    encoder_layers = len(encoder_units(module.pipe.text_encoder)) - 1  # its units but the root (kept on the device)
    # the DiT root's own weight layers are FSDP units too (embedders, output projection), offloaded like the blocks
    dit = module.pipe.transformer
    blocks = [b for _, blocks in plan_for(dit).block_lists(dit) for b in blocks.children()]
    inside = {id(m) for b in blocks for m in b.modules()}
    root_layers = sum(1 for m in weight_layers(dit, blocks) if id(m) not in inside)
    dit_units = {None: 0, "blocks": len(blocks) + root_layers, "layers": len(blocks) + len(weight_layers(dit, blocks))}
    with external_launch(rank, world, *ports):
        for name, (make, (streamed, units, encoder_sharded)) in CASES.items():
            what = f"{family} {name}, rank {rank}"
            dit_fsdp = dit_units[units]
            expected_counts = {"streamed": streamed, "fsdp": dit_fsdp + (encoder_layers if encoder_sharded else 0)}
            strategy = make()
            out = predict_here(module, prompt_loader(PROMPTS, batch_size=2 if "dp" not in name else 1), strategy, world)
            dp, dp_rank = int(strategy.layout.dp), strategy.layout.coordinates(rank)["dp"]
            expected = reference[dp_rank::dp]  # the predict sampler deals samples round-robin over the dp groups
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            if out.shape != expected.shape or not error <= 1e-5:
                failures.append(f"{what}: output {tuple(out.shape)}, relative error {error:.2e}")
            if module.seen != expected_counts:
                failures.append(f"{what}: offloaded during predict {module.seen}, expected {expected_counts}")
            failures += [f"{what} after teardown: {p}" for p in _plain_state(module)]
    with torch.no_grad():
        if not torch.equal(module.predict_step(batch, 0), reference):
            failures.append(f"{family} plain predict after the strategies, rank {rank}: differs from before")
    return failures


@pytest.mark.parametrize("family", FAMILIES)
def test_offload_equals_one_process(family):
    results = run_on_ranks(2, _every_case, family, (free_port(), free_port()), timeout_s=300)
    failures = [f for rank_failures in results for f in rank_failures]
    assert not failures, "\n".join(failures)


def _one_device(rank: int, world: int, ports: tuple[int, int]) -> list[str]:
    module = FAMILIES["pixart"]()
    batch = next(iter(prompt_loader(PROMPTS, batch_size=2)))
    with torch.no_grad():
        reference = module.predict_step(batch, 0)
    with external_launch(rank, world, *ports):
        out = predict_here(module, prompt_loader(PROMPTS, batch_size=2), DiTParallelStrategy(offload=True), world)
    failures = [] if module.seen == {"streamed": 4, "fsdp": 0} else [f"offloaded during predict: {module.seen}"]
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    if out.shape != reference.shape or not error <= 1e-5:
        failures.append(f"output {tuple(out.shape)}, relative error {error:.2e}")
    return failures + _plain_state(module)


def test_offload_on_one_device_equals_the_plain_predict():
    """Fewer devices: one rank, no parallelism, every block and encoder layer streamed. (In a rank of its own: a
    Trainer in the test process would change its thread count for the ranks forked later.)"""
    failures = run_on_ranks(1, _one_device, (free_port(), free_port()), timeout_s=300)[0]
    assert not failures, "\n".join(failures)


# -- the parallelizer itself, in one process ----------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _Model(nn.Module):
    """Blocks in a ModuleList, a tied weight between the root and block 1, and a submodule of block 0 called after the
    loop (a borrowed call, as diffusers' DiT makes)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Linear(4, 4), nn.Linear(4, 4)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.out.weight = self.blocks[1].b.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x) + self.blocks[0].a(x)


def test_apply_offload_hooks_borrowed_calls_dtype_and_remove():
    torch.manual_seed(0)
    model, x = _Model(), torch.randn(3, 4)
    reference = model(x)
    loads: list[torch.device | None] = []
    offloaded = apply_offload(model, list(model.blocks))
    for unit in offloaded.units:  # record every load: the forward and the borrowed call
        unit.load = (lambda load: lambda device: (loads.append(device), load(device)))(unit.load)
    with torch.inference_mode():
        assert torch.equal(model(x), reference)
    assert loads == [torch.device("cpu")] * 3, "block 0, block 1, then block 0 again for the borrowed call"
    assert all(u.depth == 0 and not u.saved for u in offloaded.units)
    # the weight tied to the root is not offloaded (the root needs it on the device); the others are
    assert not any(p is model.out.weight for u in offloaded.units for p in u.parameters())
    assert sum(len(u.parameters()) for u in offloaded.units) == 7
    model.to(torch.float64)  # a dtype change applies to the offloaded weights too; they stay in host memory
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    model.to(torch.float32)
    offloaded.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks or "_apply" in m.__dict__ for m in model.modules())
    assert torch.equal(model(x), reference)


def test_offload_is_refused_where_there_is_nothing_to_offload():
    from lightning_dit_parallel.plan import DiTPlan, Split
    from lightning_dit_parallel.registry import register_plan

    class NoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.proj = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(self.attn(x))

    register_plan(
        NoBlocks,
        DiTPlan(
            split_inputs={"x": Split("image", 1)},
            gather_outputs={"proj": Split("image", 1)},
            self_attention={"attn": ("image",)},
        ),
    )  # no blocks
    holder = nn.Module()
    holder.dit = NoBlocks()
    with pytest.raises(ValueError, match="nothing to offload"):
        parallelize(holder, ParallelLayout().resolve(1), None, offload=True)
    with pytest.raises(ValueError, match="offload must be a bool"):
        DiTParallelStrategy(offload="yes")
    with pytest.raises(ValueError, match="at least one unit"):
        apply_offload(holder, [])


# -- the planner ----------------------------------------------------------------------------------------------------


def test_planner_offers_offload_only_when_nothing_fits_without_it():
    from pathlib import Path

    from lightning_dit_parallel import plan_layouts
    from lightning_dit_parallel.planner.models import load_models

    flux = load_models(Path(__file__).resolve().parents[1] / "examples" / "configs" / "flux.1-dev")
    work = dict(devices=2, height=1024, width=1024, cfg=False)
    without = plan_layouts(flux, memory="4GiB", **work)
    assert without.recommended is None and not any(e.fits for e in without.layouts)
    assert not any(e.layout.offload for e in without.layouts), "offload is asked for"
    plan = plan_layouts(flux, memory="4GiB", offload=True, **work)
    chosen = plan.recommended
    assert chosen is not None and chosen.fits and chosen.layout.offload and chosen.exact
    assert chosen.layout.describe().endswith("+offload") and "host offload" in chosen.reason
    # the device holds the roots and the running units; the rest of the weights is in host memory
    element = 2
    assert chosen.memory.dit_parameters < flux.dit.numel * element / 50
    assert chosen.memory.host_parameters > flux.dit.numel * element / 2 / 1.1
    assert chosen.memory.peak <= 3 * 2**30
    assert {e.layout.offload for e in plan.layouts} == {False, True}
    # streaming costs time: the same layout without offload is faster (where both are estimated)
    by_name = {e.layout.describe(): e for e in plan.layouts}
    base = by_name[chosen.layout.describe().removesuffix(" +offload")]
    assert base.time.total_s < chosen.time.total_s
    # with room enough, offload is not considered at all
    roomy = plan_layouts(flux, memory="80GiB", offload=True, **work)
    assert roomy.recommended is not None and not any(e.layout.offload for e in roomy.layouts)


def test_auto_chooses_offload_only_when_allowed_and_needed():
    from lightning_dit_parallel.planner.layouts import Axes
    from lightning_dit_parallel.strategies.auto import AutoHints, choose_layout
    from tests.models import build_dit, dit_sampler

    sampler = dit_sampler(build_dit(sample_size=8, layers=8))
    axes = Axes(tp=False, parallel_vae=False, pipefusion=False, distrifusion=False)
    args = dict(world_size=2, nodes=1, device=torch.device("cpu"), shard_text_encoders=False, check_inputs=True)
    tiny = AutoHints(memory=1, plan_options={"reserve": 0})
    with pytest.raises(ValueError, match="no layout"):
        choose_layout(sampler, hints=tiny, axes=replace(axes, offload=True), **args)
    # the smallest peak without offload and with it, then a budget between them
    from lightning_dit_parallel.planner.models import models_from_module
    from lightning_dit_parallel.planner.planner import estimate_layouts
    from lightning_dit_parallel.planner.work import Hardware
    from lightning_dit_parallel.strategies.auto import work_for

    models = models_from_module(sampler)
    work = work_for(sampler, models, tiny)
    hw = Hardware(devices=2, memory=1, reserve=0, device_type="cpu")
    peaks = {}
    for offload in (False, True):
        plan = estimate_layouts(models, work, hw, models.dit.dtype, axes=replace(axes, offload=offload))
        peaks[offload] = min(e.memory.peak for e in plan.layouts if e.layout.offload == offload)
    assert peaks[True] < peaks[False]
    budget = AutoHints(memory=(peaks[True] + peaks[False]) // 2, plan_options={"reserve": 0})
    with pytest.raises(ValueError, match="no layout"):
        choose_layout(sampler, hints=budget, axes=axes, **args)
    chosen, _ = choose_layout(sampler, hints=budget, axes=replace(axes, offload=True), **args)
    assert chosen.layout.offload and chosen.fits


# -- CUDA -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_with_offload_is_below_the_model_size():
    """One process: the blocks stay in pinned host memory when the module moves to the GPU, and the device peak of a
    forward stays far below the model's size; the output equals the plain model on the GPU."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=8,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    ).eval()
    holder = nn.Module()
    holder.dit = model
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(2, 4, 16, 16, device="cuda")
    t = torch.tensor([3, 7], device="cuda")
    labels = torch.tensor([1, 2], device="cuda")
    with torch.no_grad():
        reference = model.cuda()(x, timestep=t, class_labels=labels).sample
    model.cpu()
    torch.cuda.empty_cache()
    parallelized = parallelize(holder, ParallelLayout().resolve(1), None, offload=True)
    try:
        torch.cuda.reset_peak_memory_stats()
        holder.cuda()  # the blocks stay on the host, pinned; the root moves
        blocks = [p for b in model.transformer_blocks for p in b.parameters()]
        assert all(p.device.type == "cpu" and p.is_pinned() for p in blocks)
        with torch.no_grad():
            out = model(x, timestep=t, class_labels=labels).sample
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        assert all(p.device.type == "cpu" for p in blocks), "the copies are dropped after each block"
    finally:
        parallelized.remove()
    assert peak < size / 2, f"device peak {peak / 2**20:.1f} MiB with offload, model {size / 2**20:.1f} MiB"
    assert ((out - reference).abs().max() / reference.abs().max()).item() <= 1e-5
