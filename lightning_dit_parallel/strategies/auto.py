"""``strategy=auto``: the layout planner chooses the degrees when the strategy sets up its environment.

``DiTParallelStrategy(auto=True)`` (or ``auto=AutoOptions(...)``, ``strategies/options.py``) calls ``choose_layout`` in
``setup_environment``. Lightning connects the
LightningModule to the strategy before it calls ``setup_environment`` (``Trainer._run``: ``strategy.connect(model)``,
then ``strategy.setup_environment()``), so the model is known there, before the process group and the mesh exist.
The choice is pure computation on each rank from the same inputs (the model, the world size, the device memory and
the ``AutoOptions``), so every rank reaches it without a collective; where devices differ in memory, give ``memory=``.

What the planner needs and the batch cannot tell yet (the dataloader comes later) are ``AutoOptions``: ``tokens`` or
``height``/``width`` (and ``frames``); without them the module's own call arguments (``PipelineSampler.call``) or
the DiT config's ``sample_size`` are read. CFG parallelism is only considered where the DiT is known to receive the
doubled batch in one call (a module with a ``guided`` flag, e.g. ``DiffusionSampler``); diffusers pipelines that call
the DiT twice per step (Wan, QwenImage) would not split.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping

import torch
from torch import nn

from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.planner.layouts import Axes
from lightning_dit_parallel.planner.models import PipelineModels, models_from_module
from lightning_dit_parallel.planner.planner import LayoutEstimate, Plan, estimate_layouts, format_size
from lightning_dit_parallel.planner.tokens import vae_factors
from lightning_dit_parallel.planner.work import Hardware, Work, parse_bytes, parse_rate
from lightning_dit_parallel.strategies.options import HARDWARE_OPTIONS, WORK_OPTIONS, AutoOptions

#: The name ``AutoOptions`` had before the strategy's options were grouped.
AutoHints = AutoOptions


def work_for(module: nn.Module, models: PipelineModels, hints: AutoOptions) -> Work:
    """The planner's ``Work`` from the hints, else from the module's call arguments or the DiT config.

    Raises:
        ValueError: when neither gives the size of a sample (the message names the hints).
    """
    options = {k: v for k, v in hints.plan_options.items() if k in WORK_OPTIONS}
    size: dict[str, int | None] = {
        "tokens": hints.tokens,
        "height": hints.height,
        "width": hints.width,
        "frames": hints.frames,
    }
    if size["tokens"] is None and (size["height"] is None or size["width"] is None):
        size = _size_from_module(module, models) or size
    if size["tokens"] is None and (size["height"] is None or size["width"] is None):
        raise ValueError(
            f"strategy=auto needs the size of a sample for {models.dit.name}: give tokens= or height= and width="
            " (and frames= for video) to DiTParallelStrategy(auto=AutoOptions(...)) (Hydra: strategy.auto.height=...),"
            " since the"
            " batch is not known when the layout is chosen."
        )
    guided = getattr(module, "guided", None)
    options.setdefault("cfg", guided if isinstance(guided, bool) else True)
    options.setdefault("cfg_calls", "doubled" if isinstance(guided, bool) else "separate")
    return Work(**size, **options)


def _size_from_module(module: nn.Module, models: PipelineModels) -> dict[str, int | None] | None:
    call = getattr(module, "call", None)
    if isinstance(call, Mapping) and call.get("height") and call.get("width"):
        return {
            "tokens": None,
            "height": int(call["height"]),
            "width": int(call["width"]),
            "frames": int(call["num_frames"]) if call.get("num_frames") else None,
        }
    sample = models.dit.config.get("sample_size")
    if isinstance(sample, int):  # latent rows and columns of an image DiT
        spatial, _, _ = vae_factors(models.dit.name, models.dit.config, models.vae)
        return {"tokens": None, "height": sample * spatial, "width": sample * spatial, "frames": None}
    return None


def device_memory(device: torch.device, local_processes: int) -> int:
    """Total memory of a CUDA device, or this machine's memory shared by its processes (CPU)."""
    from lightning_dit_parallel.planner.calibrate import device_memory as measured

    value = measured(device, local_processes)
    if value is None:
        raise ValueError(f"Cannot read the memory of {device}; give strategy=auto a memory= hint (e.g. '24GiB').")
    return value


def supported_axes(strategy_cls: type, allow_approximate: bool) -> Axes:
    """What the strategy can run: tensor parallelism and parallel VAE decode when it takes their arguments."""
    parameters = inspect.signature(strategy_cls.__init__).parameters
    layout_fields = {f.name for f in dataclasses.fields(ParallelLayout)}
    return Axes(
        tp="tp" in layout_fields and "tp_degree" in parameters,
        parallel_vae="parallel_vae" in parameters,
        pipefusion=allow_approximate,
        distrifusion=False,
    )


def _guidance_known(module: nn.Module, hints: AutoOptions) -> bool:
    """Whether classifier-free guidance is known to be on: a module's ``guided`` flag (``DiffusionSampler``) or the
    hints' ``plan_options={"cfg": True}``."""
    guided = getattr(module, "guided", None)
    return guided is True or hints.plan_options.get("cfg") is True


def choose_layout(
    module: nn.Module,
    *,
    world_size: int,
    nodes: int,
    device: torch.device,
    hints: AutoOptions,
    axes: Axes,
    shard_text_encoders: bool,
    check_inputs: bool,
) -> tuple[LayoutEstimate, Plan]:
    """The recommended layout for ``module`` on ``world_size`` ranks (pure computation, the same on every rank), for
    the dtype its DiT's parameters have.

    Raises:
        ValueError: when the work cannot be sized, or no layout fits the device memory (the message gives the
            smallest peak and its layout).
    """
    models = models_from_module(module)
    work = work_for(module, models, hints)
    if not _guidance_known(module, hints):
        # a pipeline's guidance is assumed on for the estimates, but CFG parallel fails on a pipeline run without it
        # (a guidance-distilled model, guidance_scale=1): chosen only when the module or the hints say it is on
        axes = dataclasses.replace(axes, cfg=False)
    hw_options = {k: v for k, v in hints.plan_options.items() if k in HARDWARE_OPTIONS}
    devices = max(world_size // max(nodes, 1), 1)
    memory = parse_bytes(hints.memory) if hints.memory is not None else device_memory(device, devices)
    hardware = Hardware(
        devices=devices,
        nodes=max(nodes, 1),
        memory=memory,
        device_type="cuda" if device.type == "cuda" else "cpu",
        **{
            k: (parse_bytes(v) if k == "reserve" else parse_rate(v, "FLOPS" if k == "flops" else "/s"))
            for k, v in hw_options.items()
        },
    )
    plan = estimate_layouts(
        models,
        work,
        hardware,
        models.dit.dtype,
        allow_approximate=hints.allow_approximate,
        shard_text_encoders=shard_text_encoders,
        check_inputs=check_inputs,
        axes=axes,
    )
    chosen = plan.recommended
    if chosen is None:
        smallest = min(plan.layouts, key=lambda e: e.memory.peak)
        raise ValueError(
            f"strategy=auto: no layout of {models.dit.name} on {world_size} ranks fits"
            f" {format_size(hardware.usable_memory)} usable per device; the smallest estimated peak is"
            f" {format_size(smallest.memory.peak)} ({smallest.layout.describe()}). Run `ldp-plan` for the table, or"
            " give memory=."
        )
    return chosen, plan
