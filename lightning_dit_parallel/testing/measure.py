"""Check the planner against a real run: what a rank holds and sends for one DiT call under a layout.

``measure_call`` runs on every rank of an initialised process group: it parallelizes the given DiT with the
layout, counts the parameter bytes the rank holds (``utils.memory.resident_bytes``), the bytes it sends during one
forward by kind (``utils.comm_counter.CommCounter``) and optionally the peak RSS growth of that forward, then
removes the parallelizers. ``predict_call`` gives the planner's figures for the same call, so a test or a benchmark
compares them (``bench/planner_calibration.py``, ``tests/test_planner_calibration.py``).

Tensor parallelism's collectives go through DTensor's functional collectives (``torch.ops._c10d_functional``), which
``CommCounter`` does not wrap; ``FunctionalCollectives`` counts them with the same conventions. Limit: the pipeline's
sends are counted only without ring attention (whose ``P2POp``s need the unwrapped ``isend``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_dit_parallel.planner.layouts import PlannedLayout
from lightning_dit_parallel.planner.memory import cache_bytes, dit_activation_bytes, dit_parameter_bytes
from lightning_dit_parallel.planner.spec import ModelSpec
from lightning_dit_parallel.planner.tokens import LatentGrid
from lightning_dit_parallel.planner.traffic import bytes_per_call
from lightning_dit_parallel.planner.work import Hardware, Work


@dataclass(frozen=True)
class Prediction:
    """The planner's figures for one rank and one DiT call (the busiest rank)."""

    parameter_bytes: int
    gathered_bytes: int
    activation_bytes: int
    cache_bytes: int
    bytes_sent: Mapping[str, int]

    @property
    def forward_peak_bytes(self) -> int:
        """What a forward adds on top of the parameters held: activations, gathered parameters, caches."""
        return self.activation_bytes + self.gathered_bytes + self.cache_bytes


def predict_call(
    spec: ModelSpec,
    work: Work,
    layout: PlannedLayout,
    element: int,
    device_type: str = "cpu",
    check_inputs: bool = True,
) -> Prediction:
    """The planner's parameter bytes, FSDP-gathered bytes, activation peak, PipeFusion caches and bytes by kind for
    one call of ``work.rows`` rows of ``work.tokens`` latent tokens."""
    grid = LatentGrid(1, 1, 1, int(work.tokens or 0), 1, 1, 0, (1, 1, 1))
    hw = Hardware(devices=layout.world_size, device_type=device_type)  # only the prefetch rule matters here
    held, gathered = dit_parameter_bytes(spec, layout, element, hw)
    return Prediction(
        held,
        gathered,
        dit_activation_bytes(spec, grid, work, layout, element),
        cache_bytes(spec, grid, work, layout, element),
        bytes_per_call(spec, grid, work, layout, element, check_inputs),
    )


class FunctionalCollectives(TorchDispatchMode):
    """Bytes this rank sends through ``torch.ops._c10d_functional`` collectives while active, by ``CommCounter`` kind
    and with its conventions: an all-reduce sends ``2(N-1)/N`` of its tensor, an all-gather its tensor ``N-1`` times,
    a reduce-scatter ``(N-1)/N`` of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_sent: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        namespace = getattr(func, "namespace", "")
        if namespace == "_c10d_functional" and args and isinstance(args[0], torch.Tensor):
            n = _group_size(args[-1])
            size = args[0].numel() * args[0].element_size()
            kind, sent = None, 0
            if name.startswith("all_reduce"):
                kind, sent = "all_reduce", size * 2 * (n - 1) // n
            elif name.startswith("all_gather_into_tensor"):
                kind, sent = "all_gather", size * (n - 1)
            elif name.startswith("reduce_scatter_tensor"):
                kind, sent = "reduce_scatter", size * (n - 1) // n
            elif name.startswith("all_to_all_single"):
                kind, sent = "all_to_all", size * (n - 1) // n
            if kind is not None:
                self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + sent
        return func(*args, **(kwargs or {}))


def _group_size(group_name) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name).size()
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return 1


def measure_call(
    model: nn.Module,
    inputs: Mapping[str, Any],
    layout: PlannedLayout,
    *,
    memory: bool = False,
    warmup: int = 0,
    check_inputs: bool = True,
) -> dict:
    """On this rank: parallelize ``model`` with ``layout``, run ``model(**inputs)`` (``warmup`` times unmeasured, then
    once measured), undo the parallelizers.

    Returns:
        ``{"parameter_bytes": int, "bytes_sent": {kind: int}, "peak_growth": int | None}``: parameters held after
        parallelizing (local shards, each storage once), bytes sent in the forward, and with ``memory`` the peak
        RSS growth during it.
    """
    from lightning_dit_parallel.parallel.compose import parallelize
    from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions
    from lightning_dit_parallel.testing.comm_counter import CommCounter
    from lightning_dit_parallel.utils.memory import current_rss, peak_rss, reset_peak_rss, resident_bytes

    mesh_layout = layout.to_parallel_layout().resolve(layout.world_size)
    pipeline = None
    if layout.pp_mode == "pipefusion":
        pipeline = PipelineOptions("pipefusion", layout.patches, warmup_steps=0)
    elif layout.pp_mode == "microbatch":
        pipeline = PipelineOptions("microbatch")
    parallel = parallelize(
        model, mesh_layout, mesh_layout.build_mesh("cpu"), pipeline=pipeline, check_inputs=check_inputs
    )
    try:
        held = resident_bytes(model, buffers=False)
        for _ in range(warmup):
            parallel.begin_batch()
            with torch.no_grad():
                model(**inputs)
        parallel.begin_batch()
        # ring attention's P2POps need the unwrapped isend; PipeFusion all-gathers over the ring instead
        counter = CommCounter(count_isend=layout.ring == 1 or layout.pp_mode == "pipefusion")
        functional = FunctionalCollectives()
        growth = None
        with torch.no_grad(), counter, functional:
            if memory:
                reset_peak_rss()
                before = current_rss()
            model(**inputs)
            if memory:
                growth = peak_rss() - before
    finally:
        parallel.remove()
    sent = dict(counter.bytes_sent)
    for kind, n in functional.bytes_sent.items():
        sent[kind] = sent.get(kind, 0) + n
    return {"parameter_bytes": held, "bytes_sent": sent, "peak_growth": growth}


def relative_error(predicted: float, measured: float) -> float:
    """``|predicted - measured| / measured`` (0 when both are 0)."""
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return abs(predicted - measured) / measured
