"""Memory one rank needs for a layout, component by component: parameters (exact, from the shapes), activations,
caches, encoder and VAE decode peaks (estimates).

Per rank: every DiT of the pipeline (``transformer``, ``transformer_2`` ...: each cut by the layout the same way,
one running at a time), the text and image encoders (sharded with FSDP like the DiT unless told otherwise, else
whole), the VAE whole, other components (ControlNets) whole, plus the largest phase: a DiT forward (its gathered
FSDP units, activations, caches), encoding the prompts, encoding the conditioning image, or decoding. Loading is
memory-lean (a rank reads only the parameters it keeps), so no whole-model transient is counted.

Parameters follow what the package does: a pipeline stage keeps its own blocks, the plan's shared modules and
everything outside the block lists (without FSDP or tensor parallelism only its rows of the latter between DiT calls,
all of it during one); tensor parallelism cuts the parameters of the layers its layout shards
(``tensor.resolve_layout``) along their split dim; FSDP2 cuts every (tensor-parallel local) parameter of every unit
along dim 0 into ``ceil(rows / N)`` rows per rank and, while a block runs, holds it whole (two blocks on CUDA, where
the next one is prefetched), and the DiT root's own parameters for the whole forward.

With host offload (``PlannedLayout.offload``) the blocks' and encoder layers' parameters (their FSDP shards with
FSDP) live in host memory: the device holds the roots (embeddings, final layers; their shard with FSDP) and, while a
unit runs, that unit brought from the host (with FSDP: its shard copied in and the gathered whole, two blocks on
CUDA; without: the one running block or layer). ``MemoryEstimate.host_parameters`` counts what stays on the host.

Activations are counted in token-states (``rows x local tokens x width`` elements) at the peak of one block, the
larger of its attention phase and its MLP phase, plus what the sequence-parallel kernels keep in flight and what
lives for the whole forward (input, gathered output, text context). The coefficients are measured (see
``bench/planner_calibration.py``); attention itself is assumed to run blockwise (flash / memory-efficient
kernels), so no ``S x S`` score matrix is held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_dit_parallel.parallel.rows import row_counts
from lightning_dit_parallel.planner.components import EncoderSpec, OtherSpec, TextEncoderSpec, VaeSpec
from lightning_dit_parallel.planner.layouts import PlannedLayout
from lightning_dit_parallel.planner.spec import TEXT_SEQUENCE, ModelSpec, Unit
from lightning_dit_parallel.planner.tokens import LatentGrid
from lightning_dit_parallel.planner.work import Hardware, Work

# Token-states alive at a block's peak (measured on CPU for DiT, PixArt, Flux and Wan, see the calibration bench).
#: attention phase: residual, normalized input and attention output projection (x hidden) ...
ATTN_HIDDEN = 3.0
#: ... plus queries, keys, values, attention output and rotated q/k copies (x query width / tp).
ATTN_QKV = 6.0
#: MLP phase: residual, normalized input, output (x hidden) ...
MLP_HIDDEN = 3.0
#: ... plus the up projection and its activation (x MLP width / tp).
MLP_INNER = 2.0
#: Joint attention over several sequences: the concatenated queries, keys and values (x query width / tp).
JOINT_QKV = 3.0
#: Ulysses: stacked q/k/v to send, their received copies and the re-laid-out heads (x query width / tp).
ULYSSES_QKV = 6.0
#: Ring: key/value blocks in flight (x key/value width / tp) and the float32 output accumulator (x query width).
RING_KV = 4.0
RING_ACC_BYTES = 4
#: Text encoder token-states at a layer's peak (x hidden, x MLP width).
TE_HIDDEN = 6.0
TE_MLP = 2.0
#: Text encoder attention: (heads, tokens, tokens) float32 tensors alive at once in a T5 layer (the position bias,
#: its sum with the mask, the scores and their softmax); measured on CPU: +61-66 MB while UMT5 (16 heads) encodes one
#: prompt of 512 tokens.
TE_SCORES = 4.0
#: VAE decode: full-resolution tensors (of the decoder's widest full-resolution convolution) alive at once; measured
#: on CPU for AutoencoderKL and AutoencoderKLWan decodes (within 10%).
VAE_TENSORS = 3.6
#: Frames a causal video VAE keeps of the previous chunk for its temporal convolutions.
VAE_CACHE_FRAMES = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs (the busiest rank of the layout).

    Args:
        dit_parameters: the DiTs' parameters held between uses (local shards, the rank's stage), every DiT of the
            pipeline together.
        dit_gathered: parameters gathered on top while a DiT forward runs (FSDP: the root and the running blocks).
        activations: the DiT forward's activation peak, attention included.
        caches: PipeFusion / DistriFusion stale keys and values.
        text_encoder_parameters: text encoders' parameters held (local shards with FSDP).
        text_encoder_peak: activations (and FSDP-gathered layers) while encoding the prompts.
        vae_parameters: the VAE's parameters.
        vae_decode_peak: activations of decoding one batch (this rank's band with a parallel VAE).
        image_encoder_parameters: image encoders' parameters held (local shards with FSDP).
        image_encoder_peak: activations (and FSDP-gathered layers) while encoding the conditioning image.
        other_parameters: the other components' parameters (ControlNets ...), held whole.
        components: ``(component name, parameter bytes held)`` of every component, in pipeline order.
        host_parameters: with offload, the parameter bytes one rank keeps in (pinned) host memory instead (not part
            of ``peak``, which is device memory).
    """

    dit_parameters: int
    dit_gathered: int
    activations: int
    caches: int
    text_encoder_parameters: int
    text_encoder_peak: int
    vae_parameters: int
    vae_decode_peak: int
    image_encoder_parameters: int = 0
    image_encoder_peak: int = 0
    other_parameters: int = 0
    components: tuple[tuple[str, int], ...] = ()
    host_parameters: int = 0

    @property
    def resident(self) -> int:
        return (
            self.dit_parameters
            + self.text_encoder_parameters
            + self.image_encoder_parameters
            + self.vae_parameters
            + self.other_parameters
        )

    @property
    def phases(self) -> dict[str, int]:
        """Bytes on top of the resident parameters in each phase."""
        return {
            "denoising": self.dit_gathered + self.activations + self.caches,
            "text encoding": self.text_encoder_peak,
            "image encoding": self.image_encoder_peak,
            "decoding": self.vae_decode_peak,
        }

    @property
    def peak_phase(self) -> str:
        """The phase that sets the peak."""
        phases = self.phases
        return max(phases, key=phases.__getitem__)

    @property
    def peak(self) -> int:
        """Parameters of every component plus the largest phase: denoising, text or image encoding, or decoding."""
        return self.resident + max(self.phases.values())

    def as_dict(self) -> dict:
        out: dict = {k: int(v) for k, v in self.__dict__.items() if k != "components"}
        out["components"] = {name: int(n) for name, n in self.components}
        out["peak"] = int(self.peak)
        return out


def stage_blocks(spec: ModelSpec, pp: int) -> list[range]:
    """Global block indices of each pipeline stage (the package's even split, earlier stages take the remainder)."""
    from lightning_dit_parallel.parallel.pipeline.stages import stage_sizes

    if pp == 1:
        return [range(spec.num_blocks)]
    sizes = stage_sizes(spec.num_blocks, pp)
    starts = [sum(sizes[:s]) for s in range(pp)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def _stage(spec: ModelSpec, pp: int, stage: int) -> range:
    """The blocks of ``spec`` on pipeline stage ``stage`` (the last one for a DiT with fewer stages)."""
    stages = stage_blocks(spec, pp)
    return stages[min(stage, len(stages) - 1)]


def stage_units(spec: ModelSpec, blocks: range) -> list[Unit]:
    """The units a stage holds: the root, every shared part, its own blocks."""
    return [u for u in spec.units if u.kind != "block" or u.index in blocks]


def stage_parameter_bytes(
    spec: ModelSpec, blocks: range, layout: PlannedLayout, element: int, hw: Hardware
) -> tuple[int, int]:
    """``(held between uses, gathered on top during a forward)`` of one stage of a DiT."""
    shards = layout.shard_degree
    units = stage_units(spec, blocks)
    tp = layout.tp
    if layout.offload:
        return offloaded_unit_bytes(units, shards, tp, element, hw)
    held = sum(u.shard_numel(shards, tp) for u in units) * element
    gathered = 0
    if shards > 1:
        gathered = fsdp_gathered_numel(units, shards, tp, hw, units_kind=layout.fsdp_units) * element
    elif layout.pp > 1 and tp == 1:  # stages hold their rows of the root between calls, all of it during one
        root = [shape for u in units if u.kind == "root" for shape in u.local_shapes()]
        others = sum(math.prod(shape) - stage_rows(shape, layout.pp) for shape in root) * element
        held -= others
        gathered = others
    return held, gathered


def stage_rows(shape: tuple[int, ...], stages: int) -> int:
    """Elements of the largest stage's rows of a root parameter (``pipeline/root_shards.py``: ``root_parameters``
    and ``rows.row_counts``); parameters it leaves whole, whole."""
    from lightning_dit_parallel.parallel.pipeline.root_shards import shards_rows

    if not shards_rows(shape, stages):
        return math.prod(shape)
    return row_counts(shape[0], stages)[0] * math.prod(shape[1:])


def fsdp_gathered_numel(units, shards: int, tp: int, hw: Hardware, units_kind: str = "blocks") -> int:
    """Elements FSDP2 holds on top of the shards while a forward runs: the root's rest unsharded for the whole
    forward, and while the largest unit is gathered, twice that unit: the all-gather's output buffer and the unsharded
    parameters it is copied into (the buffer is freed right after the copy, ``fsdp/gather_buffer.py``); with CUDA one
    more shard (the copy-in of the next unit's all-gather, issued while one runs). ``units_kind="layers"``: the units
    are the weight matrices (2-D or more); ``"rows"``: the matrices are never gathered, a rank holds one other rank's
    rows of the largest at a time (``fsdp/row_stream.py``)."""
    if units_kind in ("layers", "rows"):  # a weight matrix (2-D or more) at a time; the rest stays with its unit
        mats = [  # token tables split by rows are never gathered (``fsdp/vocab_rows.py``)
            (math.prod(shape), whole)
            for u in units
            for shape, whole, split in zip(u.local_shapes(tp), u.gathered_whole(), u.split_tables())
            if len(shape) >= 2 and not split
        ]
        rest = sum(
            math.prod(shape) for u in units if u.kind == "root" for shape in u.local_shapes(tp) if len(shape) < 2
        )
        largest = max((n for n, _ in mats), default=0)
        if units_kind == "rows":  # the Linears: at most two other ranks' rows at a time (the next travels meanwhile)
            streamed = max((n for n, whole in mats if not whole), default=0)
            gathered = max((n for n, whole in mats if whole), default=0)  # embedding tables, kernels: whole
            return rest + max(min(2, shards - 1) * -(-streamed // shards), 2 * gathered)
        return rest + 2 * largest + (-(-largest // shards) if hw.device_type == "cuda" else 0)
    root = sum(u.local_numel(tp) for u in units if u.kind == "root")
    blocks = sorted(((u.local_numel(tp), u.shard_numel(shards, tp)) for u in units if u.kind == "block"), reverse=True)
    if not blocks:
        return 2 * root
    # the root's weight matrices are units of their own (gathered while they run); the rest of it for the whole forward
    root_mats = [math.prod(s) for u in units if u.kind == "root" for s in u.local_shapes(tp) if len(s) >= 2]
    rest = root - sum(root_mats)
    whole, shard = blocks[0]
    # the larger of two moments: a root layer being gathered, and a block gathered while the root's rest stays gathered
    return max(rest + 2 * max(root_mats, default=0), rest + 2 * whole + (shard if hw.device_type == "cuda" else 0))


def offloaded_unit_bytes(
    units: list[Unit] | tuple[Unit, ...], shards: int, tp: int, element: int, hw: Hardware
) -> tuple[int, int]:
    """``(held on the device, brought on top while a unit runs)`` with host offload: the root stays (its shard with
    FSDP), every block, shared part or layer comes from the host. With FSDP (``shards > 1``) a running unit is its
    shard copied in plus the gathered whole, two of them on CUDA (prefetch), and the root is gathered for the whole
    forward; without, the one running unit (no prefetch) and, nested in it, the shared parts."""
    roots = [u for u in units if u.kind == "root"]
    streamed = [u for u in units if u.kind != "root"]
    if not streamed and shards > 1:  # nothing but the root: FSDP offloads the root itself
        roots, streamed = [], roots
    held = sum(u.shard_numel(shards, tp) for u in roots)
    whole = sorted((u.local_numel(tp) for u in streamed if u.kind != "shared"), reverse=True)
    shared = sum(u.local_numel(tp) for u in streamed if u.kind == "shared")
    if shards > 1:
        prefetch = 2 if hw.device_type == "cuda" else 1
        copied = max((u.shard_numel(shards, tp) for u in streamed), default=0)
        root = sum(u.local_numel(tp) - u.shard_numel(shards, tp) for u in roots)
        gathered = root + sum(whole[:prefetch]) + copied + shared
    else:
        gathered = sum(whole[:1]) + shared
    return held * element, gathered * element


def host_unit_bytes(units: list[Unit] | tuple[Unit, ...], shards: int, tp: int, element: int) -> int:
    """Bytes of ``units`` that host offload keeps in host memory (their shards with FSDP)."""
    streamed = [u for u in units if u.kind != "root"]
    if not streamed and shards > 1:
        streamed = list(units)
    return sum(u.shard_numel(shards, tp) for u in streamed) * element


def dit_parameter_bytes(spec: ModelSpec, layout: PlannedLayout, element: int, hw: Hardware) -> tuple[int, int]:
    """``(held between uses, gathered on top during a forward)`` for the busiest stage."""
    held, gathered, _ = dits_parameter_bytes([spec], layout, element, hw)
    return held, gathered


def dits_parameter_bytes(
    specs: list[ModelSpec], layout: PlannedLayout, element: int, hw: Hardware
) -> tuple[int, int, list[int]]:
    """``(held, gathered, held per DiT)`` of every DiT of a pipeline on the busiest stage.

    Each DiT is cut by the layout the same way (pipeline stage ``s`` holds stage ``s`` of every DiT); all are held,
    one runs at a time, so the held bytes add up and the gathered ones are the largest DiT's.
    """
    best: tuple[int, int, list[int]] = (0, 0, [0] * len(specs))
    for stage in range(layout.pp):
        per = []
        for spec in specs:
            stages = stage_blocks(spec, layout.pp)
            per.append(stage_parameter_bytes(spec, stages[min(stage, len(stages) - 1)], layout, element, hw))
        held = sum(h for h, _ in per)
        gathered = max((g for _, g in per), default=0)
        if stage == 0 or held + gathered > best[0] + best[1]:
            best = (held, gathered, [h for h, _ in per])
    return best


def local_tokens(spec: ModelSpec, grid: LatentGrid, work: Work, layout: PlannedLayout) -> dict[str, int]:
    """Tokens of each cut sequence one rank holds in one pass (sequence shards padded, PipeFusion / DistriFusion
    patches)."""
    full = sequence_tokens(spec, grid, work)
    shards = layout.sequence_degree
    if layout.patches:  # PipeFusion cuts every sequence into patches (the text too, once per step), then shards each
        return {name: -(-(-(-n // layout.patches)) // shards) for name, n in full.items()}
    local = {name: -(-n // shards) for name, n in full.items()}
    if layout.distrifusion > 1:  # DistriFusion: each rank one patch of the latent, the text whole
        local = {name: (-(-n // layout.distrifusion) if name != TEXT_SEQUENCE else n) for name, n in local.items()}
    return local


def sequence_tokens(spec: ModelSpec, grid: LatentGrid, work: Work) -> dict[str, int]:
    """Whole-sequence tokens of every sequence the plan cuts.

    Raises:
        ValueError: for a cut sequence the work does not size (neither text, the latent nor ``work.sequences``).
    """
    latent = spec.latent_sequences
    extra = dict(work.sequences)
    counts: dict[str, int] = {}
    for name in spec.sequences:
        if name == TEXT_SEQUENCE:
            counts[name] = work.text_tokens
        elif name in extra:
            counts[name] = extra[name]
        elif name == (latent[0] if latent else name):
            counts[name] = grid.tokens
        else:
            raise ValueError(
                f"The plan of {spec.name} cuts a sequence {name!r} besides {latent[0]!r}; give its token count with"
                f" --sequence {name}=N (Work.sequences)."
            )
    return counts


def rows_per_pass(work: Work, layout: PlannedLayout) -> int:
    """Batch rows one rank computes in one forward pass (CFG split, micro-batches)."""
    rows = work.rank_rows(layout.cfg)
    if layout.pp_mode == "microbatch":
        rows = -(-rows // min(layout.pp, rows))
    return rows


def block_activation(
    index: int, spec: ModelSpec, layout: PlannedLayout, local: dict[str, int], rows: int, element: int, text_tokens: int
) -> int:
    """Bytes alive at the peak of block ``index`` on one rank."""
    block = spec.blocks[index]
    carried = sum(local.get(s, 0) for s in block.sequences) or local.get(spec.latent_sequences[0], 0)
    tp = layout.tp
    attention = [a for a in spec.attention if a.block == index]
    self_attn = [a for a in attention if a.kind in ("self", "tail")]
    q = max((a.q_width for a in attention), default=block.hidden) / tp
    kv = max((a.kv_width for a in attention), default=block.hidden) / tp
    attn = carried * (ATTN_HIDDEN * block.hidden + ATTN_QKV * q)
    if any(len(a.sequences) > 1 for a in self_attn):
        attn += carried * JOINT_QKV * q
    if self_attn and layout.ulysses > 1:
        attn += carried * ULYSSES_QKV * q
    if self_attn and layout.ring > 1:
        attn += carried * (RING_KV * kv + RING_ACC_BYTES / element * q)
    if any(a.kind == "cross" for a in attention):
        attn += 2 * text_tokens * kv  # the text context's keys and values
    mlp = carried * (MLP_HIDDEN * block.hidden + MLP_INNER * block.mlp / tp)
    if block.parallel:  # the activated MLP, the attention output and their concatenation, alive together
        mlp = carried * (MLP_HIDDEN * block.hidden + 2 * (block.mlp / tp + q))
    return int(rows * max(attn, mlp) * element)


def dit_activation_bytes(spec: ModelSpec, grid: LatentGrid, work: Work, layout: PlannedLayout, element: int) -> int:
    """The DiT forward's activation peak on one rank: the largest block plus what lives for the whole forward."""
    full = sequence_tokens(spec, grid, work)
    local = local_tokens(spec, grid, work, layout)
    rows = rows_per_pass(work, layout)
    peak = max(
        (block_activation(i, spec, layout, local, rows, element, work.text_tokens) for i in range(spec.num_blocks)),
        default=0,
    )
    hidden = max((b.hidden for b in spec.blocks), default=0)
    latent = full.get(spec.latent_sequences[0], grid.tokens) if spec.latent_sequences else grid.tokens
    # the gathered output (whole sequence), the model input, the text context
    lasting = rows * (2 * latent * spec.output_width + work.text_tokens * hidden) * element
    return int(peak + lasting)


def cache_bytes(spec: ModelSpec, grid: LatentGrid, work: Work, layout: PlannedLayout, element: int) -> int:
    """PipeFusion: keys and values of the whole sequence for every self-attention layer of the stage, for the rank's
    heads (with Ulysses and tensor parallelism inside the stage, ``1 / (ulysses x tp)`` of them; Ring gathers every
    token); DistriFusion: the same for every layer."""
    if layout.exact:
        return 0
    full = sequence_tokens(spec, grid, work)
    rows = work.rank_rows(layout.cfg)
    stages = stage_blocks(spec, layout.pp)
    own = max(stages, key=len) if layout.pp_mode == "pipefusion" else range(spec.num_blocks)
    total = 0
    for a in spec.self_attention:
        if a.block in own:
            total += 2 * rows * sum(full.get(s, 0) for s in a.sequences) * a.kv_width * element
    return total // (layout.ulysses * layout.tp)


def encoder_work(enc: EncoderSpec, work: Work, split: int = 1) -> tuple[int, int]:
    """``(rows, tokens)`` of one encoder call on one rank: a text encoder encodes the batch's prompts up to its token
    limit (diffusers' pipelines encode the negative prompts in a second call, see ``encoder_calls``), an image
    encoder one image per sample. ``split``: the ranks a sharded encoder's batch is split over
    (``fsdp.encoder_rows``: ``ceil(rows / split)`` each; a single row is not split)."""
    rows = work.batch
    tokens = enc.max_tokens
    if enc.kind != "image":
        tokens = min(work.text_tokens, enc.max_tokens) if enc.max_tokens else work.text_tokens
    return (-(-rows // split) if rows > 1 else rows), tokens


def encoder_calls(enc: EncoderSpec, work: Work) -> int:
    """Calls of one encoder per batch: a text encoder twice with CFG (the prompts, then the negative prompts)."""
    return 2 if work.cfg and enc.kind != "image" else 1


def encoder_row_split(layout: PlannedLayout, shard: bool) -> int:
    """The ranks a sharded encoder's batch is split over: the model-parallel ranks (``fsdp.encoder_rows_mesh``) when
    the encoders are sharded, else 1."""
    return layout.model_parallel_degree if shard and layout.encoder_shard_degree > 1 else 1


def encoder_bytes(
    enc: EncoderSpec, layout: PlannedLayout, work: Work, element: int, hw: Hardware, shard: bool
) -> tuple[int, int]:
    """``(held, peak while encoding)`` of one encoder on one rank (sharded with FSDP when ``shard``; its layers in host
    memory with offload)."""
    shards = layout.encoder_shard_degree if shard else 1
    held = sum(u.shard_numel(shards) for u in enc.units) * element
    gathered = 0
    if layout.offload:
        held, gathered = offloaded_unit_bytes(enc.units, shards, 1, element, hw)
    elif shards > 1:  # sharded one weight layer at a time (``fsdp.encoder_units``), the Linears by rows streaming
        gathered = fsdp_gathered_numel(enc.units, shards, 1, hw, units_kind="rows") * element
    rows, tokens = encoder_work(enc, work, encoder_row_split(layout, shard))
    act = rows * tokens * (TE_HIDDEN * enc.hidden + TE_MLP * enc.mlp) * element
    if shards > 1 and any(split for u in enc.units for split in u.split_tables()):
        act += shards * rows * tokens * enc.hidden * element  # a split table's lookup: every rank's tokens, partial
    scores = int(rows * enc.heads * tokens * tokens * 4 * TE_SCORES)  # attention with a position bias (T5)
    return held, int(gathered + act + scores)


def text_encoder_bytes(
    encoders: list[TextEncoderSpec], layout: PlannedLayout, work: Work, element: int, hw: Hardware, shard: bool
) -> tuple[int, int]:
    """``(held, peak while encoding)`` of encoders on one rank (sharded with FSDP when ``shard``): held adds up,
    they encode one after the other."""
    held = peak = 0
    for enc in encoders:
        h, p = encoder_bytes(enc, layout, work, element, hw, shard)
        held += h
        peak = max(peak, p)
    return held, peak


def vae_bytes(
    vae: VaeSpec | None, grid: LatentGrid, work: Work, layout: PlannedLayout, element: int
) -> tuple[int, int]:
    """``(parameters, decode peak)`` of the VAE on one rank; a parallel VAE holds its band of the activations.

    Video VAEs with temporal compression decode one latent frame (``temporal`` output frames, plus the frames their
    causal convolutions cache) at a time, as diffusers' causal video VAEs do; the decoded video itself is held whole.
    """
    if vae is None:
        return 0, 0
    params = vae.numel * element
    height, width = grid.height * grid.spatial, grid.width * grid.spatial
    frames_out = (grid.frames - 1) * grid.temporal + 1 if grid.temporal > 1 else grid.frames
    chunk = grid.temporal + VAE_CACHE_FRAMES if grid.temporal > 1 else grid.frames
    bands = layout.model_parallel_degree if layout.parallel_vae else 1
    act = work.batch * chunk * height * width * vae.decoder.full_res_channels * VAE_TENSORS * element / bands
    output = work.batch * frames_out * height * width * vae.out_channels * (element + 4)  # decoded, then float32
    return params, int(act + output)


def memory_estimate(
    spec: ModelSpec,
    encoders: list[TextEncoderSpec],
    vae: VaeSpec | None,
    grid: LatentGrid,
    work: Work,
    hw: Hardware,
    layout: PlannedLayout,
    element: int,
    shard_text_encoders: bool = True,
    *,
    more_dits: list[ModelSpec] | tuple = (),
    image_encoders: list[EncoderSpec] | tuple = (),
    others: list[OtherSpec] | tuple = (),
    dit_names: list[str] | tuple = (),
) -> MemoryEstimate:
    """Every part of one rank's memory for ``layout``, component by component.

    Args:
        spec: the planned DiT; ``more_dits`` the pipeline's other DiTs (``transformer_2`` ...), held the same way.
        encoders: text encoders; ``image_encoders`` image encoders. Both are sharded with FSDP when
            ``shard_text_encoders`` (the layout's shard group), else held whole.
        vae: the VAE (whole); ``others``: components held whole (ControlNets ...).
        dit_names: component names of ``spec`` and ``more_dits`` (for ``components``).
    """
    dits = [spec, *more_dits]
    names = [*dit_names[: len(dits)]]
    names += ["transformer" if i == 0 else f"transformer_{i + 1}" for i in range(len(names), len(dits))]
    held, gathered, per_dit = dits_parameter_bytes(dits, layout, element, hw)
    host = 0
    if layout.offload:  # the busiest stage's blocks of every DiT, and every encoder's layers
        host = max(
            sum(
                host_unit_bytes(stage_units(s, _stage(s, layout.pp, stage)), layout.shard_degree, layout.tp, element)
                for s in dits
            )
            for stage in range(layout.pp)
        )
        shards = layout.encoder_shard_degree if shard_text_encoders else 1
        host += sum(host_unit_bytes(e.units, shards, 1, element) for e in (*encoders, *image_encoders))
    te_held, te_peak = text_encoder_bytes(list(encoders), layout, work, element, hw, shard_text_encoders)
    ie_held, ie_peak = text_encoder_bytes(list(image_encoders), layout, work, element, hw, shard_text_encoders)
    vae_params, vae_peak = vae_bytes(vae, grid, work, layout, element)
    components = list(zip(names, per_dit))
    components += [
        (e.name, encoder_bytes(e, layout, work, element, hw, shard_text_encoders)[0])
        for e in (*encoders, *image_encoders)
    ]
    if vae is not None:
        components.append(("vae", vae_params))
    components += [(o.name, o.numel * element) for o in others]
    return MemoryEstimate(
        dit_parameters=held,
        dit_gathered=gathered,
        activations=max(dit_activation_bytes(s, grid, work, layout, element) for s in dits),
        caches=sum(cache_bytes(s, grid, work, layout, element) for s in dits),
        text_encoder_parameters=te_held,
        text_encoder_peak=te_peak,
        vae_parameters=vae_params,
        vae_decode_peak=vae_peak,
        image_encoder_parameters=ie_held,
        image_encoder_peak=ie_peak,
        other_parameters=sum(o.numel for o in others) * element,
        components=tuple(components),
        host_parameters=host,
    )
