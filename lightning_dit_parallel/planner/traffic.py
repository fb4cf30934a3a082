"""Bytes one rank sends per denoising step, by kind, as ``utils.comm_counter.CommCounter`` counts them.

The figures follow the DESIGN table and what the implementation moves:

* Ulysses (``all_to_all``): q, k, v and the output of every self-attention layer, ``(U-1)/U`` of the local
  ``rows x local tokens x width`` each;
* Ring (``p2p``): the key/value block passed ``R-1`` times per self-attention layer;
* sequence gather (``all_gather``): the output of the plan's gather point, over Ulysses then over Ring;
* CFG (``all_gather``): this rank's half of the output once per call;
* FSDP (``all_gather``): every unit's padded shard to the other ``N-1`` ranks each time it runs (blocks and the
  root's weight layers once per micro-batch or patch; the plan's shared modules twice: in their block and after the
  loop);
* pipeline (``p2p``, ``broadcast``): the tensors a block carries across each stage boundary, per micro-batch or
  PipeFusion patch, the last stage's broadcast of the output, and (without FSDP or tensor parallelism) each stage's
  rows of the weights outside the blocks, once per call;
* tensor parallel (``all_reduce``): every row-wise layer's output (the attention output and MLP down projections:
  two ``rows x tokens x hidden`` per block in the DESIGN table), the gathered per-sample modulation, and the
  outputs of the root's split Linears (per sample, text token or latent token, ``tp_shape.root_gather_role``);
* linear attention (``all_reduce``): ``rows x heads x d x (d + 1)`` float32 sums per layer;
* DistriFusion (``all_gather``): every layer's fresh keys and values of the rank's patch (asynchronous);
* the replicated-input guard (``all_gather``): 5 float64 numbers per forward argument, once per DiT call.
"""

from __future__ import annotations

import pickle
from collections import defaultdict

import torch

from lightning_dit_parallel.planner.layouts import PlannedLayout
from lightning_dit_parallel.planner.memory import (
    local_tokens,
    sequence_tokens,
    stage_blocks,
    stage_rows,
    stage_units,
)
from lightning_dit_parallel.planner.spec import TEXT_SEQUENCE, ModelSpec
from lightning_dit_parallel.planner.tokens import LatentGrid
from lightning_dit_parallel.planner.work import Work

KINDS: tuple[str, ...] = ("all_to_all", "p2p", "all_gather", "all_reduce", "broadcast")

#: Bytes of the guard's fingerprint of one forward argument (5 float64 numbers).
GUARD_BYTES_PER_ARGUMENT = 5 * 8


def _broadcast_header_bytes(shape: tuple[int, ...]) -> int:
    """Pickled size of the output description the last stage broadcasts first (plus its size tensor)."""
    from lightning_dit_parallel.parallel.pipeline.comm import _TensorMeta

    return len(pickle.dumps([(_TensorMeta(shape, torch.float32),)])) + 8


#: The kind ``CommCounter`` files each method's transfers under.
KIND_OF: dict[str, str] = {
    "ulysses": "all_to_all",
    "ring": "p2p",
    "sequence_gather": "all_gather",
    "cfg_gather": "all_gather",
    "fsdp": "all_gather",
    "fsdp_rows": "broadcast",
    "pipeline": "p2p",
    "pipeline_output": "broadcast",
    "pipeline_root": "broadcast",
    "tp": "all_reduce",
    "tp_gather": "all_gather",
    "pipefusion_ring": "all_gather",
    "linear_attention": "all_reduce",
    "distrifusion": "all_gather",
    "guard": "all_gather",
}


def bytes_by_method(
    spec: ModelSpec, grid: LatentGrid, work: Work, layout: PlannedLayout, element: int, check_inputs: bool = True
) -> list[dict[str, int]]:
    """Bytes each pipeline stage's ranks send in one DiT call (a PipeFusion call: all its patches), by method
    (see ``KIND_OF``); one dict per stage."""
    full = sequence_tokens(spec, grid, work)
    local = local_tokens(spec, grid, work, layout)
    rows = work.rank_rows(layout.cfg)  # rows of this cfg rank in the call
    latent = spec.latent_sequences[0] if spec.latent_sequences else None
    latent_local = local.get(latent, grid.tokens) if latent else grid.tokens
    latent_full = full.get(latent, grid.tokens) if latent else grid.tokens
    passes = 1
    if layout.pp_mode == "microbatch":
        passes = min(layout.pp, rows)
    elif layout.pp_mode == "pipefusion":
        passes = layout.patches
    u, r, tp = layout.ulysses, layout.ring, layout.tp
    out = rows * latent_full * spec.output_width * element  # this cfg rank's output of the whole sequence
    stages = stage_blocks(spec, layout.pp)
    per_stage = []
    for stage, blocks in enumerate(stages):
        last = stage == len(stages) - 1
        sent: dict[str, float] = defaultdict(float)
        for a in spec.attention:
            if a.block >= 0 and a.block not in blocks:
                continue  # another stage's layer (attention outside the blocks runs on every stage)
            tokens = sum(local.get(s, 0) for s in a.sequences)
            if layout.pp_mode == "pipefusion":
                tokens *= layout.patches  # local tokens are one patch's; a call runs every patch
            if a.kind in ("self", "tail"):
                if u > 1:  # q, k, v there and the output back: (U-1)/U of each stays off this rank
                    sent["ulysses"] += rows * tokens * (2 * a.q_width + 2 * a.kv_width) / tp * element * (u - 1) / u
                if r > 1:  # the (2, rows, tokens, kv) key/value block, R-1 times around the ring; PipeFusion
                    # all-gathers each pass's fresh keys and values over the ring instead
                    method = "pipefusion_ring" if layout.pp_mode == "pipefusion" else "ring"
                    sent[method] += (r - 1) * rows * tokens * 2 * a.kv_width / tp * element
                if layout.distrifusion > 1:
                    sent["distrifusion"] += (layout.distrifusion - 1) * rows * tokens * 2 * a.kv_width * element
            elif a.kind == "linear" and layout.sequence_degree > 1:
                d = a.q_width // a.heads
                sums = rows * a.heads * d * (d + 1) * 4
                for n in (u, r):
                    if n > 1:
                        sent["linear_attention"] += sums * 2 * (n - 1) / n
        if tp > 1:  # every row-wise layer's output all-reduced; gathered column-wise outputs (per sample)
            for i in blocks:
                block = spec.blocks[i]
                carried = sum(local.get(s, 0) for s in block.sequences) or latent_local
                text = local.get(TEXT_SEQUENCE, 0)
                # a double-stream block's latent layers run on the latent tokens, its context layers on the text
                tokens = (carried - text, text) if block.tp_reduce_text_width else (carried, 0)
                width = tokens[0] * block.tp_reduce_width + tokens[1] * block.tp_reduce_text_width
                sent["tp"] += rows * width * element * 2 * (tp - 1) / tp * passes
                counts = {
                    "carried": carried,
                    "latent": carried - text if block.text_token_params else latent_local,
                    "text": text or work.text_tokens,
                }
                stats = sum(n * counts[role] for n, role in block.tp_norms)  # float32 sums per token
                sent["tp"] += rows * stats * 4 * 2 * (tp - 1) / tp * passes
                sent["tp_gather"] += rows * -(-block.tp_gather_width // tp) * element * (tp - 1) * passes
                sent["tp"] += rows * block.tp_sample_reduce_width * element * 2 * (tp - 1) / tp * passes
            # the root's split Linears, gathered once per forward body: the output projection on the last stage
            tokens = {"latent": latent_local, "text": local.get(TEXT_SEQUENCE, 0) or work.text_tokens, "sample": 1}
            for role, features in spec.tp_root_gathers:
                if features % tp or (role == "latent" and features == spec.output_width and not last):
                    continue
                sent["tp_gather"] += rows * tokens[role] * (features // tp) * element * (tp - 1) * passes
        if last and layout.sequence_degree > 1:  # the gather point runs on the last stage: over Ulysses, then Ring
            shard = rows * latent_local * spec.output_width * element * (layout.patches or 1)
            sent["sequence_gather"] += shard * (u - 1) + shard * u * (r - 1)
        if layout.shard_degree > 1:
            n = layout.shard_degree
            for unit in stage_units(spec, blocks):
                # every unit once per micro-batch or patch, which re-run the forward body: blocks, the root's weight
                # layers (units of their own; the rest of the root, norms and tables, is small) and the shared parts
                # (in their block and after the loop, on the last stage)
                calls = passes
                if unit.kind == "shared":
                    calls *= (unit.index in blocks) + (1 if last else 0)
                if layout.fsdp_units == "rows":  # the Linears' rows broadcast by their ranks, the rest all-gathered
                    streamed, whole = unit.shard_numel_split(n, tp)
                    sent["fsdp_rows"] += streamed * element * (n - 1) * calls
                    sent["fsdp"] += whole * element * (n - 1) * calls
                else:
                    sent["fsdp"] += unit.shard_numel(n, tp) * element * (n - 1) * calls
        if layout.pp > 1 and not last:
            first_next = spec.blocks[stages[stage + 1].start]
            carried = sum(local.get(s, 0) for s in first_next.sequences) or latent_local
            flags = len(first_next.sequences) or 1  # one uint8 flag per tensor of the call
            if layout.pp_mode == "pipefusion":  # every patch crosses once
                sent["pipeline"] += layout.patches * (rows * carried * first_next.hidden * element + flags)
            else:  # every micro-batch's rows cross once
                sent["pipeline"] += rows * carried * first_next.hidden * element + passes * flags
        if layout.pp > 1 and layout.shard_degree == 1 and tp == 1 and not layout.offload:
            # the root's rows of every stage broadcast to the others at each DiT call (pipeline/root_shards.py)
            root = [shape for unit in spec.units if unit.kind == "root" for shape in unit.local_shapes()]
            sent["pipeline_root"] += sum(stage_rows(shape, layout.pp) for shape in root) * element * (layout.pp - 1)
        if layout.pp > 1 and last:
            header = _broadcast_header_bytes((rows, latent_full, spec.output_width))
            sent["pipeline_output"] += (out + header) * (layout.pp - 1)
        if layout.cfg > 1:
            sent["cfg_gather"] += out * (layout.cfg - 1)
        group = layout.cfg * layout.pp * layout.sequence_degree * layout.tp  # ranks fed identical inputs
        if check_inputs and group > 1:  # the first call of a batch (measure_call's); later calls send none
            sent["guard"] += spec.forward_arguments * GUARD_BYTES_PER_ARGUMENT * (group - 1)
        per_stage.append({k: int(v) for k, v in sent.items() if v})
    return per_stage


def bytes_per_call(
    spec: ModelSpec, grid: LatentGrid, work: Work, layout: PlannedLayout, element: int, check_inputs: bool = True
) -> dict[str, int]:
    """Bytes the busiest rank sends in one DiT call, by ``CommCounter`` kind (the maximum over stages)."""
    per_stage = []
    for methods in bytes_by_method(spec, grid, work, layout, element, check_inputs):
        kinds: dict[str, int] = defaultdict(int)
        for method, n in methods.items():
            kinds[KIND_OF[method]] += n
        per_stage.append(kinds)
    return {kind: max(s.get(kind, 0) for s in per_stage) for kind in KINDS if any(s.get(kind, 0) for s in per_stage)}


def bytes_per_step(
    spec: ModelSpec, grid: LatentGrid, work: Work, layout: PlannedLayout, element: int, check_inputs: bool = True
) -> dict[str, int]:
    """Bytes the busiest rank sends per denoising step (its ``rank_calls_per_step`` DiT calls), by kind."""
    call = bytes_per_call(spec, grid, work, layout, element, check_inputs)
    return {kind: n * work.rank_calls_per_step(layout.cfg) for kind, n in call.items()}
