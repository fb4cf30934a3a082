"""Estimated time of a denoising step and of the whole work, from compute throughput and link bandwidth.

Compute: ``2 x parameters x tokens`` FLOPs for the per-token linear layers of every block, ``4 x S_q x S_k x
width`` for every attention layer, split over the ranks as the layout splits the work (CFG halves, sequence
shards, tensor-parallel slices, pipeline stages). A pipeline of ``pp`` stages over ``M`` micro-batches or
patches takes ``(M + pp - 1) / M`` of one stage's time for the whole call.

Communication: bytes by method (``traffic.bytes_by_method``) over the bandwidth of the axis that carries them
(the inter-node bandwidth when the axis' ranks span nodes: ranks are laid out with ``tp``, then ``ulysses`` ...
innermost). Ring and DistriFusion transfers overlap the attention they feed, FSDP's all-gathers overlap compute on
CUDA (prefetch), everything else is exposed. Latency and kernel efficiency at small sizes are not modelled.

Host offload copies the weights a rank streams (its stage's blocks, FSDP shards with FSDP) from host memory once per
forward pass over ``host_bandwidth``: hidden behind compute on CUDA with FSDP (its prefetch), exposed otherwise
(``offload.apply_offload`` copies each block when it starts); the encoders' layers once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_dit_parallel.planner.components import TextEncoderSpec, VaeSpec
from lightning_dit_parallel.planner.layouts import DEGREES, PlannedLayout
from lightning_dit_parallel.planner.memory import (
    encoder_calls,
    encoder_row_split,
    encoder_work,
    host_unit_bytes,
    local_tokens,
    sequence_tokens,
    stage_blocks,
    stage_units,
)
from lightning_dit_parallel.planner.spec import TEXT_SEQUENCE, ModelSpec
from lightning_dit_parallel.planner.tokens import LatentGrid
from lightning_dit_parallel.planner.traffic import bytes_by_method
from lightning_dit_parallel.planner.work import Hardware, Work

#: Mesh axes each method's transfers travel over.
METHOD_AXES: dict[str, tuple[str, ...]] = {
    "ulysses": ("ulysses",),
    "ring": ("ring",),
    "sequence_gather": ("ring", "ulysses"),
    "cfg_gather": ("cfg",),
    "fsdp": ("dp", "cfg", "ring", "ulysses"),
    "fsdp_rows": ("dp", "cfg", "ring", "ulysses"),
    "pipeline": ("pp",),
    "pipeline_output": ("pp",),
    "pipeline_root": ("pp",),
    "tp": ("tp",),
    "tp_gather": ("tp",),
    "pipefusion_ring": ("ring",),
    "linear_attention": ("ring", "ulysses"),
    "distrifusion": ("distrifusion",),
    "guard": ("cfg", "pp", "ring", "ulysses", "tp"),
}

#: PipeFusion's exact warm-up steps per batch (the package's default).
WARMUP_STEPS = 1


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds, for the busiest rank.

    Args:
        compute_s: compute of one step.
        exposed_comm_s: communication of one step not hidden behind compute.
        step_s: one denoising step (compute + exposed communication).
        encode_s: text encoding of one batch.
        decode_s: VAE decode of one batch.
        total_s: the whole work: every data-parallel group's batches, each encoded, denoised and decoded.
    """

    compute_s: float
    exposed_comm_s: float
    step_s: float
    encode_s: float
    decode_s: float
    total_s: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def crosses_nodes(layout: PlannedLayout, axes: tuple[str, ...], devices_per_node: int) -> bool:
    """Whether a group over ``axes`` spans more than one node (ranks row-major over ``DEGREES``)."""
    degrees = layout.degrees()
    extent = 1
    for i, axis in enumerate(DEGREES):
        if axis in axes and degrees[axis] > 1:
            stride = math.prod(degrees[a] for a in DEGREES[i + 1 :])
            extent = max(extent, stride * degrees[axis])
    return extent > devices_per_node


def stage_flops(
    spec: ModelSpec, grid: LatentGrid, work: Work, layout: PlannedLayout, blocks: range
) -> tuple[float, float]:
    """``(linear, attention)`` FLOPs one rank of a stage spends on one pass of the call's rows."""
    full = sequence_tokens(spec, grid, work)
    local = local_tokens(spec, grid, work, layout)
    rows = work.rank_rows(layout.cfg)
    latent = spec.latent_sequences[0] if spec.latent_sequences else None
    latent_local = local.get(latent, grid.tokens) if latent else grid.tokens
    tp = layout.tp
    linear = 2.0 * rows * spec.root_token_params * latent_local
    for i in blocks:
        block = spec.blocks[i]
        carried = sum(local.get(s, 0) for s in block.sequences) or latent_local
        if block.text_token_params:  # double-stream: latent layers on the latent tokens, context layers on the text
            text = local.get(TEXT_SEQUENCE, 0)
            latent_params = block.token_params - block.text_token_params
            work_tokens = latent_params * (carried - text) + block.text_token_params * text
        else:
            work_tokens = block.token_params * carried
        linear += 2.0 * rows * work_tokens / tp
    attention = 0.0
    for a in spec.attention:
        if a.block >= 0 and a.block not in blocks:
            continue
        if a.kind in ("self", "tail"):
            queries = sum(local.get(s, 0) for s in a.sequences)
            keys = sum(full.get(s, 0) for s in a.sequences)
            attention += 4.0 * rows * queries * keys * a.q_width / tp
        elif a.kind == "cross":
            attention += 4.0 * rows * latent_local * work.text_tokens * a.q_width / tp
        else:  # linear attention: two (d x d) products per token and head
            d = a.q_width // max(a.heads, 1)
            attention += 4.0 * rows * latent_local * a.heads * d * d / tp
    return linear, attention


def time_estimate(
    spec: ModelSpec,
    encoders: list[TextEncoderSpec],
    vae: VaeSpec | None,
    grid: LatentGrid,
    work: Work,
    hw: Hardware,
    layout: PlannedLayout,
    element: int,
    check_inputs: bool = True,
) -> TimeEstimate:
    """The step time and the whole work's time of ``layout`` (``encoders``: text and image encoders; the DiT
    ``spec`` is the one that runs, a pipeline's other DiTs take its turns)."""
    stages = stage_blocks(spec, layout.pp)
    flops = [stage_flops(spec, grid, work, layout, blocks) for blocks in stage_blocks(spec, layout.pp)]
    pass_s = [(lin + att) / hw.flops for lin, att in flops]
    attention_s = max(att for _, att in flops) / hw.flops
    rows = work.rank_rows(layout.cfg)
    if layout.pp_mode == "microbatch":
        m = min(layout.pp, rows)
        compute = max(pass_s) * (m + layout.pp - 1) / m
    elif layout.pp_mode == "pipefusion":
        m = layout.patches
        piped = max(pass_s) * (m + layout.pp - 1)  # each pass covers one patch
        exact = PlannedLayout(dp=layout.dp, cfg=layout.cfg, pp=layout.pp, pp_mode="microbatch")
        full_pass = [sum(stage_flops(spec, grid, work, exact, blocks)) / hw.flops for blocks in stages]
        warm = min(WARMUP_STEPS, work.steps)
        compute = (warm * sum(full_pass) + (work.steps - warm) * piped) / work.steps
    else:
        compute = pass_s[0]
    methods = bytes_by_method(spec, grid, work, layout, element, check_inputs)
    busiest = max(methods, key=lambda m: sum(m.values()))
    exposed = 0.0
    for method, n in busiest.items():
        bandwidth = hw.inter_node_bandwidth if crosses_nodes(layout, METHOD_AXES[method], hw.devices) else hw.bandwidth
        seconds = n / bandwidth
        if method in ("ring", "distrifusion"):
            seconds = max(0.0, seconds - attention_s)
        elif method == "fsdp" and hw.device_type == "cuda":
            seconds = max(0.0, seconds - compute)  # prefetched all-gathers (rows streaming's broadcasts: exposed)
        exposed += seconds
    if layout.offload:
        exposed += _offload_seconds(spec, work, hw, layout, element, compute)
    step = (compute + exposed) * work.rank_calls_per_step(layout.cfg)
    split = encoder_row_split(layout, shard=True)  # the default: encoders sharded where the layout cuts memory
    encode = (
        sum(2.0 * enc.numel * math.prod(encoder_work(enc, work, split)) * encoder_calls(enc, work) for enc in encoders)
        / hw.flops
    )
    if layout.offload:  # every layer from the host once per batch
        encode += (
            sum(host_unit_bytes(enc.units, layout.encoder_shard_degree, 1, element) for enc in encoders)
            / hw.host_bandwidth
        )
    decode = 0.0
    if vae is not None:
        pixels = grid.height * grid.spatial * grid.width * grid.spatial
        frames_out = (grid.frames - 1) * grid.temporal + 1 if grid.temporal > 1 else grid.frames
        bands = layout.model_parallel_degree if layout.parallel_vae else 1
        decode = 2.0 * vae.decoder.macs_per_pixel * pixels * frames_out * work.batch / hw.flops / bands
    batches = -(-work.total_samples // (layout.dp * work.batch))
    total = batches * (work.steps * step + encode + decode)
    calls = work.rank_calls_per_step(layout.cfg)
    return TimeEstimate(compute * calls, exposed * calls, step, encode, decode, total)


def _offload_seconds(
    spec: ModelSpec, work: Work, hw: Hardware, layout: PlannedLayout, element: int, compute: float
) -> float:
    """Exposed seconds of one DiT call spent copying the busiest stage's offloaded weights from host memory, once per
    forward pass (micro-batch, PipeFusion patch)."""
    rows = work.rank_rows(layout.cfg)
    passes = min(layout.pp, rows) if layout.pp_mode == "microbatch" else layout.patches or 1
    streamed = max(
        host_unit_bytes(stage_units(spec, blocks), layout.shard_degree, layout.tp, element)
        for blocks in stage_blocks(spec, layout.pp)
    )
    seconds = passes * streamed / hw.host_bandwidth
    if layout.fsdp and layout.shard_degree > 1 and hw.device_type == "cuda":
        return max(0.0, seconds - compute)  # FSDP copies the shards in with its prefetched all-gathers
    return seconds
