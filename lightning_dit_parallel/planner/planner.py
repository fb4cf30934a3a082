"""``plan_layouts``: every valid layout of a model on some devices for some work, with its memory per rank, bytes
per step and estimated time, whether it fits, and one recommendation with its reason.

Host offload (``Axes.offload``) is a last resort: only when no layout fits (none the recommendation may take) is
every layout estimated again with its weights in host memory (``+offload``), and those are ranked with the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from lightning_dit_parallel.planner.layouts import Axes, PlannedLayout, enumerate_layouts
from lightning_dit_parallel.planner.memory import MemoryEstimate, memory_estimate
from lightning_dit_parallel.planner.models import PipelineModels, load_models, models_from_module
from lightning_dit_parallel.planner.speed import TimeEstimate, time_estimate
from lightning_dit_parallel.planner.tokens import LatentGrid, latent_grid
from lightning_dit_parallel.planner.traffic import bytes_per_step
from lightning_dit_parallel.planner.work import Hardware, Work, dtype_bytes, parse_bytes, parse_rate

GiB = 2**30


def format_size(n: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB), e.g. ``7.8 GiB``, ``312 MiB``."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.3g} MiB"


@dataclass(frozen=True)
class LayoutEstimate:
    """One layout and what the planner expects of it.

    Args:
        layout: the degrees and options.
        memory: bytes per rank, by part (``memory.peak`` is the figure compared with the device).
        bytes_per_step: bytes the busiest rank sends per denoising step, by ``CommCounter`` kind.
        time: estimated seconds.
        fits: the peak is at most the usable memory per device.
        recommended: the planner's choice (at most one layout).
        reason: why it is recommended, or why it does not fit.
    """

    layout: PlannedLayout
    memory: MemoryEstimate
    bytes_per_step: Mapping[str, int]
    time: TimeEstimate
    fits: bool
    recommended: bool = False
    reason: str = ""

    @property
    def exact(self) -> bool:
        return self.layout.exact

    @property
    def memory_per_rank_bytes(self) -> int:
        return int(self.memory.peak)

    def as_json(self) -> dict:
        """The JSON object ``ldp-plan --json`` prints for this layout."""
        return {
            "layout": self.layout.as_dict(),
            "name": self.layout.describe(),
            "exact": self.exact,
            "fits": self.fits,
            "memory_per_rank_bytes": self.memory_per_rank_bytes,
            "memory": self.memory.as_dict(),
            "bytes_per_step": dict(self.bytes_per_step),
            "time": self.time.as_dict(),
            "recommended": self.recommended,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Plan:
    """What ``plan_layouts`` computed: the inputs it used and every layout's estimate, best first."""

    models: PipelineModels
    work: Work
    hardware: Hardware
    dtype: str
    grid: LatentGrid
    layouts: tuple[LayoutEstimate, ...]

    @property
    def recommended(self) -> LayoutEstimate | None:
        return next((e for e in self.layouts if e.recommended), None)

    def __iter__(self):
        return iter(self.layouts)

    def __len__(self) -> int:
        return len(self.layouts)


def plan_layouts(
    source: str | Path | nn.Module | PipelineModels,
    *,
    devices: int,
    nodes: int = 1,
    memory: str | int = "24GiB",
    dtype: str = "bfloat16",
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    tokens: int | None = None,
    text_tokens: int = 512,
    batch: int = 1,
    samples: int | None = None,
    cfg: bool = True,
    cfg_calls: str = "doubled",
    steps: int = 50,
    sequences: Mapping[str, int] | None = None,
    flops: str | float = "100TFLOPS",
    bandwidth: str | float = "25GB/s",
    inter_node_bandwidth: str | float = "12.5GB/s",
    reserve: str | int = "1GiB",
    device_type: str = "cuda",
    host_bandwidth: str | float = "25GB/s",
    offload: bool = False,
    allow_approximate: bool = False,
    shard_text_encoders: bool = True,
    check_inputs: bool = True,
    axes: Axes | None = None,
    text_encoder_configs: list[str | Path] | None = None,
    vae_config: str | Path | None = None,
) -> Plan:
    """Every valid layout for a model, devices and work, each with memory per rank, bytes per step, estimated time
    and whether it fits; the fastest that fits (exact methods only unless ``allow_approximate``) is recommended.

    Args:
        source: a transformer ``config.json``, a pipeline folder (its ``model_index.json`` components: every
            transformer, text and image encoder, the VAE, ControlNets; see ``load_models``), a module holding a
            planned DiT (e.g. a LightningModule), or ``PipelineModels``.
        devices, nodes: devices per node and nodes.
        memory: memory per device (``"24GiB"``, ``"80GB"`` or bytes).
        dtype: the dtype the models run in.
        height, width, frames, tokens, text_tokens, batch, samples, cfg, cfg_calls, steps, sequences: the work
            (see ``Work``).
        flops: achieved matrix-multiply throughput per device (``"150TFLOPS"`` or FLOP/s).
        bandwidth: bytes/s a device sends within its node; ``inter_node_bandwidth`` across nodes.
        reserve: memory per device kept free.
        device_type: ``"cuda"`` or ``"cpu"`` (prefetch and overlap, see ``Hardware``).
        host_bandwidth: bytes/s a device reads from pinned host memory (host offload).
        offload: when no layout fits, consider every layout again with host offload (same as ``Axes(offload=True)``).
        allow_approximate: PipeFusion and DistriFusion may be recommended.
        shard_text_encoders: with FSDP, the text and image encoders are sharded too (``shard_modules``), else
            held whole.
        check_inputs: the strategy's replicated-input check is on (its small all-gather is counted).
        axes: which kinds of parallelism to consider (default: all).
        text_encoder_configs, vae_config: config files, instead of those found next to the transformer config.

    Returns:
        A ``Plan`` whose ``layouts`` are sorted: fitting before not fitting, then by estimated total time.

    Raises:
        ValueError: for a model without a plan, inconsistent work or hardware, or no layout at all.
    """
    if isinstance(source, PipelineModels):
        models = source
    elif isinstance(source, nn.Module):
        models = models_from_module(source)
    else:
        models = load_models(source, text_encoder_configs, vae_config)
    work = Work(
        height=height,
        width=width,
        frames=frames,
        tokens=tokens,
        text_tokens=text_tokens,
        batch=batch,
        samples=samples,
        cfg=cfg,
        cfg_calls=cfg_calls,
        steps=steps,
        sequences=dict(sequences or {}),
    )
    hardware = Hardware(
        devices=devices,
        nodes=nodes,
        memory=parse_bytes(memory),
        flops=parse_rate(flops, "FLOPS"),
        bandwidth=parse_rate(bandwidth, "/s"),
        inter_node_bandwidth=parse_rate(inter_node_bandwidth, "/s"),
        reserve=parse_bytes(reserve),
        device_type=device_type,
        host_bandwidth=parse_rate(host_bandwidth, "/s"),
    )
    axes = axes or Axes()
    if offload and not axes.offload:
        axes = replace(axes, offload=True)
    return estimate_layouts(
        models,
        work,
        hardware,
        dtype,
        allow_approximate=allow_approximate,
        shard_text_encoders=shard_text_encoders,
        check_inputs=check_inputs,
        axes=axes,
    )


def estimate_layouts(
    models: PipelineModels,
    work: Work,
    hardware: Hardware,
    dtype: str,
    *,
    allow_approximate: bool = False,
    shard_text_encoders: bool = True,
    check_inputs: bool = True,
    axes: Axes = Axes(),
) -> Plan:
    """``plan_layouts`` on already-read models, work and hardware (pure computation: every rank gets the same)."""
    element = dtype_bytes(dtype)
    spec = models.dit
    grid = latent_grid(spec.name, spec.config, models.vae, work)
    encoders = list(models.text_encoders)
    options = dict(
        rows=work.rows,
        tokens=grid.tokens,
        latent_height=grid.height,
        samples=work.total_samples,
        batch=work.batch,
        cfg_split=work.cfg and work.cfg_calls == "doubled",
        cfg_separate=work.cfg and work.cfg_calls == "separate",
        has_vae=models.vae is not None and models.vae.bands,
        axes=axes,
    )
    layouts = list(enumerate_layouts(spec, hardware.world_size, **options))
    for more in models.more_dits:  # every DiT of the pipeline is cut by the same layout
        valid = set(enumerate_layouts(more, hardware.world_size, **options))
        layouts = [lay for lay in layouts if lay in valid]

    def estimate(layout: PlannedLayout) -> LayoutEstimate:
        memory = memory_estimate(
            spec,
            encoders,
            models.vae,
            grid,
            work,
            hardware,
            layout,
            element,
            shard_text_encoders,
            more_dits=models.more_dits,
            image_encoders=models.image_encoders,
            others=models.others,
            dit_names=[name for name, _ in models.dits],
        )
        traffic = bytes_per_step(spec, grid, work, layout, element, check_inputs)
        time = time_estimate(
            spec, [*encoders, *models.image_encoders], models.vae, grid, work, hardware, layout, element, check_inputs
        )
        return LayoutEstimate(layout, memory, traffic, time, memory.peak <= hardware.usable_memory)

    estimates = [estimate(layout) for layout in layouts]
    sharded = [layout for layout in layouts if layout.fsdp]
    if axes.fsdp_layers:
        # FSDP with the other units: whole blocks or weight layers gathered (more held while one runs, the all-gathers
        # prefetched on a GPU) instead of the default's rows streaming
        others = ("blocks", "layers")
        estimates += [
            estimate(replace(layout, fsdp_units=u)) for layout in sharded for u in others if u != layout.fsdp_units
        ]
    if axes.offload and not any(e.fits and (e.exact or allow_approximate) for e in estimates):
        # the last resort: the same layouts with the weights in host memory, streamed to the device per unit
        estimates += [estimate(replace(layout, offload=True)) for layout in layouts]
    if not estimates:
        raise ValueError(
            f"No valid layout of {spec.name} on {hardware.world_size} ranks for this work ({work}); the heads"
            f" {spec.head_counts()} or the block count {spec.num_blocks} may not divide any degree."
        )
    ranked = sorted(estimates, key=lambda e: (not e.fits, *_rank_key(e)))
    return Plan(models, work, hardware, dtype, grid, tuple(_recommend(ranked, hardware, allow_approximate)))


def _rank_key(e: LayoutEstimate) -> tuple:
    """Faster first; then fewer bytes, less memory, fewer kinds of parallelism (simpler)."""
    active = sum(v > 1 for v in e.layout.degrees().values()) + e.layout.fsdp + e.layout.parallel_vae + e.layout.offload
    return (round(e.time.total_s, 6), sum(e.bytes_per_step.values()), e.memory.peak, active)


def _recommend(ranked: list[LayoutEstimate], hw: Hardware, allow_approximate: bool) -> list[LayoutEstimate]:
    usable = hw.usable_memory
    allowed = [e for e in ranked if e.fits and (e.exact or allow_approximate)]
    out: list[LayoutEstimate] = []
    best = allowed[0] if allowed else None
    for e in ranked:
        if e is best:
            runner = allowed[1] if len(allowed) > 1 else None
            reason = (
                f"fits: {format_size(e.memory.peak)} of {format_size(usable)} usable per device; the fastest of"
                f" {len(allowed)} fitting {'' if allow_approximate else 'exact '}layouts"
                f" ({e.time.step_s:.3g} s per step, {e.time.total_s:.3g} s for the work)"
            )
            if runner is not None:
                slower = runner.time.total_s / max(e.time.total_s, 1e-12)
                reason += f"; next: {runner.layout.describe()} at {slower:.2f}x"
            if e.layout.offload:
                reason += (
                    f"; with host offload only (no layout fits without it): {format_size(e.memory.host_parameters)}"
                    " of weights per rank in pinned host memory, streamed to the device every step"
                )
            out.append(replace(e, recommended=True, reason=reason))
        elif not e.fits:
            needs = f"needs {format_size(e.memory.peak)} per device, {format_size(usable)} usable"
            out.append(replace(e, reason=needs))
        elif not e.exact and not allow_approximate:
            out.append(replace(e, reason="approximate (stale activations); allow_approximate to consider it"))
        else:
            out.append(e)
    return out
