"""``parallelize(module, layout, mesh)``: find the planned DiTs in a module and apply every parallelizer.

Each parallelizer is one concern with an apply/remove pair; this function only composes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from lightning_dit_parallel.parallel.cache import StepCacheConfig, apply_step_cache, check_step_cache, decision_group
from lightning_dit_parallel.parallel.composition import check_composition
from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions, apply_distrifusion
from lightning_dit_parallel.parallel.fsdp import (
    SHARD_AXES,
    FsdpUnits,
    apply_encoder_rows,
    apply_fsdp,
    apply_vocab_rows,
    block_units,
    check_fsdp_units,
    encoder_mesh,
    encoder_paths,
    encoder_rows_mesh,
    encoder_units,
    module_units,
    resolve_fsdp_units,
    shard_mesh,
    shards_encoders,
    vocab_tables,
    weight_layers,
)
from lightning_dit_parallel.parallel.guard import CheckInputs, apply_input_guard, check_inputs_option, replicated_group
from lightning_dit_parallel.parallel.guidance import apply_cfg_parallel, check_guided
from lightning_dit_parallel.parallel.incomplete import check_complete
from lightning_dit_parallel.parallel.input_limits import apply_input_limits, refused_inputs
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.offload import apply_offload
from lightning_dit_parallel.parallel.pipeline import PipelineOptions, apply_pipeline
from lightning_dit_parallel.parallel.pipeline.root_shards import apply_root_shards
from lightning_dit_parallel.parallel.pipeline.stages import ReleasedBlock, assign_stages, check_cuts_on_every_stage
from lightning_dit_parallel.parallel.regional_compile import CompileOption, apply_regional_compile, check_compile_option
from lightning_dit_parallel.parallel.sequence.backends import LSEFallback
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.parallel.sequence.ulysses import UlyssesOverlap, check_overlap_option
from lightning_dit_parallel.parallel.tensor import (
    TensorParallelLayout,
    apply_tensor_parallel,
    check_deferred_packed,
    check_layout,
    resolve_layout,
)
from lightning_dit_parallel.parallel.vae import VaeCut, apply_parallel_vae, find_vaes
from lightning_dit_parallel.plan import DiTPlan, is_within
from lightning_dit_parallel.registry import find_planned_modules
from lightning_dit_parallel.utils.logging import rank_zero_log


class Removable(Protocol):
    """A parallelizer's undo. ``remove`` may use collectives; one whose ``remove`` does also has ``discard()``, the
    undo without them (see ``Parallelized.discard``)."""

    def remove(self) -> None: ...


@dataclass
class Parallelized:
    """What ``parallelize`` installed; ``remove()`` undoes all of it, last applied first."""

    paths: list[str] = field(default_factory=list)
    applied: list[Removable] = field(default_factory=list)

    def remove(self) -> None:
        """Remove every parallelizer, last applied first (collectives: FSDP, tensor parallelism and pipeline stages
        gather the weights back). When one fails (a peer is gone), it and all that follow are discarded instead
        (see ``discard``) and the error is raised afterwards."""
        while self.applied:
            item = self.applied.pop()
            try:
                item.remove()
            except BaseException as error:  # noqa: BLE001 -- re-raised by _discard_all, after the others are undone
                self._discard_all(error)

    @property
    def removal_needs_peers(self) -> bool:
        """Whether ``remove`` communicates (a parallelizer with a ``discard``: FSDP, tensor parallelism, pipeline
        stages, DistriFusion's gathers in flight); otherwise it only takes hooks off, whatever the peers do."""
        return any(hasattr(item, "discard") for item in self.applied)

    def discard(self) -> None:
        """Undo every parallelizer, last applied first, without any collective: after a failure, when the peers may
        be inside another collective or dead. Hooks go as in ``remove``; the weights this rank holds only a part of
        become meta tensors and their modules are marked incomplete (``incomplete.py``). Every parallelizer is tried;
        the first error is raised afterwards."""
        self._discard_all(None)

    def _discard_all(self, error: BaseException | None) -> None:
        while self.applied:
            item = self.applied.pop()
            try:
                getattr(item, "discard", item.remove)()
            except BaseException as exc:  # noqa: BLE001 -- the first error is raised below
                error = error or exc
        if error is not None:
            raise error

    def begin_batch(self) -> None:
        """A new batch starts: parallelizers that keep state across DiT calls (PipeFusion) reset it."""
        for item in self.applied:
            begin = getattr(item, "begin_batch", None)
            if begin is not None:
                begin()

    def end_batch(self) -> None:
        """The batch's predict step returned: parallelizers that check a whole batch's DiT calls (CFG parallel's call
        pattern) raise here, the same ``ValueError`` on every rank."""
        for item in self.applied:
            end = getattr(item, "end_batch", None)
            if end is not None:
                end()


def parallelize(
    module: nn.Module,
    layout: ParallelLayout,
    mesh,
    *,
    shard_modules: Sequence[str] | None = None,
    pipeline: PipelineOptions | None = None,
    check_inputs: CheckInputs = True,
    parallel_vae: bool = False,
    distrifusion: DistriFusionOptions | None = None,
    offload: bool = False,
    fsdp_units: FsdpUnits = "auto",
    cache: StepCacheConfig | None = None,
    compile: CompileOption = False,
    lse_fallback: LSEFallback = "warn",
    ulysses_overlap: UlyssesOverlap = "auto",
) -> Parallelized:
    """Apply the layout's parallelism to every submodule of ``module`` whose class has a plan.

    Order of application (``remove`` undoes it in reverse): pipeline stages release the blocks of other stages and
    pipeline the forward, tensor parallelism (``tp``) splits the heads and MLP features of the blocks a rank holds
    (DTensors), FSDP shards the parameters a rank computes with (over the non-tp axes: 2-D with tp), sequence
    parallelism installs its split/gather/attention hooks, CFG parallelism splits the doubled batch or pairs the
    separate conditional and unconditional calls of each step (``guidance/``), the parallel VAE decode
    (``parallel_vae``) bands the VAEs' decoders, the input limits refuse the arguments this layout cannot take
    (``input_limits.py``), and
    the replicated-input guard (``check_inputs``) checks the uncut arguments (its pre-hook runs first in each DiT
    forward, then the limits', then CFG's). With ``offload``, host offload comes right after FSDP: the shards FSDP makes
    stay in host memory (``CPUOffloadPolicy``), and the blocks and encoder layers FSDP does not shard are streamed by
    ``offload.apply_offload``.

    Args:
        module: usually the LightningModule; the DiTs inside it are found by their plans.
        layout: a resolved layout (see ``ParallelLayout.resolve``).
        mesh: the device mesh built from ``layout``.
        shard_modules: with ``layout.fsdp``, paths (relative to ``module``) of further modules to shard, e.g.
            ``("text_encoder",)``; each weight layer, then each layer of their outermost ``nn.ModuleList``s, is one FSDP
            unit (``fsdp.encoder_units``). ``None`` (the default): every transformers ``PreTrainedModel`` outside the
            planned DiTs (the text and image encoders, e.g. ``pipe.text_encoder``, ``pipe.image_encoder``; see
            ``fsdp.encoder_paths``); ``()``: none. Each must run on every rank of the shard group in step (diffusers
            pipelines call each encoder once per batch on every rank).
        pipeline: with ``layout.pp > 1``, how the blocks are pipelined (default: ``PipelineOptions()``).
        check_inputs: with model parallelism (cfg, pp, ring, ulysses or tp > 1), check that the ranks of each
            model-parallel group pass the DiT identical arguments (see ``parallel/guard.py``): ``True``
            in the first DiT call after each ``Parallelized.begin_batch()``, ``"every_call"`` in every call.
        parallel_vae: decode the latents of every VAE found by its cut (``parallel/vae/``) in bands along
            the height over each model-parallel group (exact; the encoder stays whole). With model parallelism 1
            there is nothing to band; the VAEs are still looked for, so a module without one fails the same way.
        distrifusion: run the sequence-parallel axis (``ring``) as DistriFusion (stale keys and values of the other
            patches, gathered asynchronously) instead of exact Ring attention; needs ``pp``, ``ulysses`` and ``tp`` 1
            (``composition.py``).
        offload: keep the weights of the transformer blocks and of the encoders' layers in (pinned) host memory and
            bring each unit to the device for its forward only. Where FSDP shards a DiT or an encoder, its units'
            shards are offloaded by FSDP2 (``CPUOffloadPolicy``; the root's shard stays on the device); every other
            block (pipeline stages, tensor parallelism, sequence or data parallelism alone) and every encoder kept
            whole (``shard_modules=()``, or a layout that does not shard them) is streamed by
            ``offload.apply_offload``. The roots (embeddings, final layers) stay on the device. The encoders are
            ``shard_modules`` or, when that is ``None`` or empty, every transformers ``PreTrainedModel`` outside the
            DiTs. On a CPU device the weights are already in host memory: the forward is the plain one.
        fsdp_units: with ``layout.fsdp``, what one FSDP unit of a DiT is, i.e. what a rank gathers whole at once:
            ``"blocks"`` (each transformer block; fewest all-gathers), ``"layers"`` (each weight layer - Linear,
            convolution, embedding - of the blocks and the root, the rest of a block as its own unit: a lower peak,
            more and smaller all-gathers; see ``fsdp.weight_layers``), ``"rows"`` (the layers' units, the Linears
            never gathered whole: each rank's rows are broadcast in turn and multiplied where they arrive,
            ``fsdp/row_stream.py``: the lowest peak; not with ``tp > 1``) or ``"auto"`` (the default: ``"rows"``,
            ``"layers"`` with ``tp > 1``).
        cache: step caching (``parallel/cache/``), installed last but for the guard, also in one process
            (every degree 1); one decision per model-parallel group (``cache.apply``). Refused (``ValueError``, before
            any collective) with PipeFusion and DistriFusion.
        compile: regional compilation after every parallelizer: ``torch.compile`` on each block of the plans' block
            lists (``True``: the default backend, or a backend name; ``regional_compile.py``).
        lse_fallback: sequence parallelism's Ring/USP with an attention backend (``set_attention_backend``) that gives
            no log-sum-exp: ``"warn"`` once and use torch's kernel for the ring blocks, or ``"error"``.
        ulysses_overlap: Ulysses attention (ring degree 1) in head groups whose all-to-alls overlap the attention of
            the others: ``False`` (off), ``True`` (2 groups), an int (that many, at most heads / ulysses_degree), or
            ``"auto"`` (what ``bench/ulysses_overlap.py`` measured faster on the device type; off where no gain was
            measured). Exact either way; see ``sequence/ulysses.py``.

    Raises:
        ValueError: for a layout and options that do not compose (``composition.composition_problems``: e.g. pipeline
            options without stages, DistriFusion off the ring axis, caching with PipeFusion or DistriFusion,
            ``shard_modules`` without FSDP, stages or tensor parallelism), before anything is installed.
        ValueError: with ``parallel_vae``, when no VAE has a cut or a diffusers VAE class has none, or a VAE layer
            cannot be banded exactly.
        ValueError: when model parallelism is requested and no submodule has a plan, a plan does not fit,
            or ``shard_modules`` names a module that does not exist.
        ValueError: with ``offload``, when there is nothing to offload (no plan names blocks, FSDP shards no DiT and
            no encoder has layers); pure, on every rank before any collective.
    """
    check_complete(module)  # a module that a failed predict left with meta weights (incomplete.py) needs a reload
    check_fsdp_units(fsdp_units)
    if layout.fsdp:
        fsdp_units = resolve_fsdp_units(fsdp_units, int(layout.tp))
    result = Parallelized()
    check_composition(
        layout,
        pipeline=pipeline,
        distrifusion=distrifusion is not None,
        cache=cache.method if cache is not None else None,
        shard_modules=shard_modules,
        ulysses_overlap=ulysses_overlap,
    )
    cuts_memory = shards_encoders(layout.fsdp, int(layout.pp), int(layout.tp))
    if not isinstance(offload, bool):
        raise ValueError(f"offload must be a bool; got {offload!r}.")
    vaes = find_vaes(module) if parallel_vae else []
    if (
        layout.sequence_degree == 1
        and layout.cfg == 1
        and not layout.fsdp
        and layout.pp == 1
        and layout.tp == 1
        and not offload
    ):
        if cache is not None:  # one process (or data parallel only): caching alone
            planned = find_planned_modules(module)
            _check_step_cache(planned, layout, cache, pipeline, distrifusion)
            _apply_step_cache(result, module, planned, mesh, cache, layout.fsdp)
        return result
    planned = find_planned_modules(module)
    # with offload, the encoders that are not sharded are streamed whole; given shard_modules are the encoders
    default_encoders = (
        encoder_paths(module, [path for path, _, _ in planned])
        if shard_modules is None or (offload and not shard_modules)
        else ()
    )
    if shard_modules is None:
        shard_modules = default_encoders if cuts_memory else ()
    extra = [(path, _submodule(module, path)) for path in shard_modules]
    whole = [(path, _submodule(module, path)) for path in default_encoders if not extra] if offload else []
    for path in shard_modules:
        overlap = [p for p, _, _ in planned if is_within(p, path) or is_within(path, p)]
        if overlap:
            raise ValueError(
                f"shard_modules entry {path!r} overlaps the planned DiT(s) {overlap}, which FSDP shards already."
            )
    check_compile_option(compile)
    if lse_fallback not in ("warn", "error"):
        raise ValueError(f"lse_fallback must be 'warn' or 'error', got {lse_fallback!r}.")
    check_overlap_option(ulysses_overlap)
    if layout.cfg > 1:
        check_guided(module, int(layout.cfg))
    if layout.pp > 1 and layout.sequence_degree > 1:
        _check_pipeline_with_sequence(planned, layout, pipeline or PipelineOptions())
    tp_layouts = _resolve_tensor_parallel(module, planned, layout) if layout.tp > 1 else []  # before any collective
    if offload:
        _check_offload(planned, [*extra, *whole], layout)
    if cache is not None:
        _check_step_cache(planned, layout, cache, pipeline, distrifusion)
    result.paths.extend(path or type(dit).__name__ for path, dit, _ in planned)
    try:
        if layout.pp > 1:
            # the root is sharded between DiT calls unless FSDP or tensor parallelism cut it, or offload streams it
            shard_root = not layout.fsdp and layout.tp == 1 and not offload
            _apply_pipeline(result, planned, layout, mesh, pipeline or PipelineOptions(), shard_root)
        if layout.tp > 1:
            for (_, dit, _), tp_layout in zip(planned, tp_layouts):
                result.applied.append(apply_tensor_parallel(dit, tp_layout, mesh["tp"]))
            sources = ", ".join(t.source for t in tp_layouts)
            rank_zero_log(f"tensor parallel (tp={layout.tp}) on {result.paths}: {sources}")
        sharded_dits = _apply_fsdp(result, module, planned, mesh, offload, fsdp_units) if layout.fsdp else False
        sharded_encoders = _shard_encoders(result, extra, mesh, layout.fsdp, offload) if extra else False
        if offload:
            streamed = [] if sharded_dits else planned
            encoders = whole + ([] if sharded_encoders else extra)
            _apply_offload(
                result,
                streamed,
                encoders,
                to_device_on_remove=(layout.pp > 1 or layout.tp > 1) and mesh.device_type != "cpu",
            )
        pipefusion = layout.pp > 1 and (pipeline or PipelineOptions()).mode == "pipefusion"
        if layout.sequence_degree > 1 and distrifusion is not None:
            groups = SequenceGroups.from_mesh(mesh)
            for _, dit, plan in planned:
                result.applied.append(apply_distrifusion(dit, plan, groups, distrifusion))
            rank_zero_log(f"DistriFusion over {layout.ring} patches ({distrifusion.describe()}) on {result.paths}")
        elif layout.sequence_degree > 1 and not pipefusion:  # PipeFusion shards each patch itself
            groups = SequenceGroups.from_mesh(mesh)
            for _, dit, plan in planned:
                result.applied.append(
                    apply_sequence_parallel(
                        dit, plan, groups, lse_fallback=lse_fallback, ulysses_overlap=ulysses_overlap
                    )
                )
            rank_zero_log(f"sequence parallel (ring={layout.ring}, ulysses={layout.ulysses}) on {result.paths}")
        if layout.cfg > 1:
            for _, dit, plan in planned:
                result.applied.append(apply_cfg_parallel(dit, plan, mesh.get_group("cfg"), fsdp=bool(sharded_dits)))
            rank_zero_log(f"cfg parallel (cfg={layout.cfg}) on {result.paths}")
        if vaes and layout.model_parallel_degree > 1:
            _apply_parallel_vae(result, vaes, mesh)
        patched = layout.sequence_degree > 1 or pipefusion
        for _, dit, plan in planned:  # ahead of every hook but the guard's: arguments this layout cannot take
            refused = refused_inputs(plan, layout, patched)
            if refused:
                result.applied.append(apply_input_limits(dit, refused))
        if cache is not None:  # after every parallelizer but the guard: its hooks see their arguments
            _apply_step_cache(result, module, planned, mesh, cache, layout.fsdp)
        if compile is not False:
            result.applied.append(apply_regional_compile([(dit, plan) for _, dit, plan in planned], compile))
        if check_inputs_option(check_inputs) and layout.model_parallel_degree > 1:
            group = replicated_group(mesh)
            for _, dit, _ in planned:  # last applied, so its pre-hook runs first and sees the uncut arguments
                result.applied.append(apply_input_guard(dit, group, every_call=check_inputs == "every_call"))
    except BaseException:
        result.remove()
        raise
    return result


def _resolve_tensor_parallel(
    module: nn.Module, planned: list[tuple[str, nn.Module, DiTPlan]], layout: ParallelLayout
) -> list[TensorParallelLayout]:
    """Each DiT's tensor-parallel layout, checked against the degrees (pure: the same ValueError on every rank)."""
    layouts = []
    for _, dit, plan in planned:
        layouts.append(resolve_layout(dit, plan))
        check_layout(dit, plan, layouts[-1], layout)
    check_deferred_packed(module, [(dit, tp) for (_, dit, _), tp in zip(planned, layouts)])
    return layouts


def _shard_encoders(
    result: Parallelized, extra: list[tuple[str, nn.Module]], mesh, fsdp: bool, offload: bool = False
) -> bool:
    """FSDP2 on each ``shard_modules`` entry (the encoders), one unit per weight layer (``fsdp.encoder_units``), its
    Linears never gathered whole (rows streaming, ``fsdp/row_stream.py``: an encoder runs once per batch, so the lowest
    peak costs nothing visible) and its token table split by rows instead of FSDP's (``fsdp/vocab_rows.py``), over
    ``encoder_mesh``, and each encoder's batch split over the ranks that encode the same prompts
    (``fsdp.encoder_rows``); whether it sharded (not over one rank)."""
    encoders = encoder_mesh(mesh, fsdp)
    if encoders.size() == 1:
        return False
    rows = encoder_rows_mesh(mesh)
    for _, sub in extra:
        tables = vocab_tables(sub, encoders.size())
        ignored = [tables[0].weight] if tables else []
        result.applied.append(
            apply_fsdp(sub, encoder_units(sub), encoders, offload=offload, rows=True, ignored=ignored)
        )
        if tables:
            result.applied.append(apply_vocab_rows(sub, tables, encoders))
        if rows.size() > 1:
            result.applied.append(apply_encoder_rows(sub, rows.get_group()))
    split = f", each batch split over {rows.size()} ranks" if rows.size() > 1 else ""
    rank_zero_log(
        f"FSDP over {encoders.size()} ranks{' (shards in host memory)' if offload else ''} on the encoders"
        f" {[p for p, _ in extra]}{split}"
    )
    return True


def _check_step_cache(
    planned: list[tuple[str, nn.Module, DiTPlan]],
    layout: ParallelLayout,
    cache: StepCacheConfig,
    pipeline: PipelineOptions | None,
    distrifusion: DistriFusionOptions | None,
) -> None:
    """Step caching's refusals (pure: the same ValueError on every rank, before any collective)."""
    options = pipeline or PipelineOptions()
    for _, dit, plan in planned:
        assignment = assign_stages(dit, plan, int(layout.pp), options.layers_per_stage) if layout.pp > 1 else None
        check_step_cache(
            cache,
            dit,
            plan,
            pipefusion=layout.pp > 1 and options.mode == "pipefusion",
            distrifusion=distrifusion is not None,
            assignment=assignment,
        )


def _apply_step_cache(
    result: Parallelized,
    module: nn.Module,
    planned: list[tuple[str, nn.Module, DiTPlan]],
    mesh,
    cache: StepCacheConfig,
    fsdp: bool,
) -> None:
    """Step caching on every planned DiT; the deciding group over the cfg, ring, ulysses and tp axes (with FSDP also
    its shard axes; without the cfg axis for separate CFG calls), the pipeline stages linked by their stage loop; the
    parallelizers' weight hooks (FSDP's gathers, offload's copies) left out for skipped blocks."""
    group = decision_group(mesh, fsdp) if mesh is not None else None
    links = {
        id(item.model): item.loop.link for item in result.applied if hasattr(item, "loop") and hasattr(item, "model")
    }
    cfgs = {
        id(item.model): item for item in result.applied if hasattr(item, "separate_calls") and hasattr(item, "model")
    }
    separate_group = decision_group(mesh, fsdp, cfg=False) if cfgs else None
    sequences = {  # sequence parallelism: its padding tokens are left out of the statistic
        id(item.model): item for item in result.applied if hasattr(item, "padding_rows") and hasattr(item, "model")
    }
    weight_sources = [item for item in result.applied if hasattr(item, "weight_hooks")]

    def weight_hooks(block: nn.Module) -> list:
        return [hooks for source in weight_sources for hooks in source.weight_hooks(block)]

    for _, dit, plan in planned:
        cfg = cfgs.get(id(dit))
        result.applied.append(
            apply_step_cache(
                dit,
                plan,
                cache,
                group,
                links.get(id(dit)),
                steps_source=module,
                weight_hooks=weight_hooks,
                separate_group=separate_group,
                separate_calls=(lambda cfg=cfg: cfg.separate_calls) if cfg else None,
                padding_rows=sequences[id(dit)].padding_rows if id(dit) in sequences else None,
            )
        )
    rank_zero_log(f"step cache ({cache.describe()}) on {result.paths or [type(d).__name__ for _, d, _ in planned]}")


def _check_offload(
    planned: list[tuple[str, nn.Module, DiTPlan]], encoders: list[tuple[str, nn.Module]], layout: ParallelLayout
) -> None:
    """``offload=True`` needs something to offload (pure: the same ValueError on every rank, before any
    collective): a transformer block of a plan, an encoder layer, or a DiT that FSDP shards (its root then streams
    whole)."""
    blocks = sum(len(block_units(plan.block_lists(dit))) for _, dit, plan in planned)
    layers = sum(len(_offload_units(sub)) for _, sub in encoders)
    sharded = layout.fsdp and int(layout.dp) * int(layout.cfg) * int(layout.ring) * int(layout.ulysses) > 1
    if not blocks and not layers and not sharded:
        dits = [path or type(dit).__name__ for path, dit, _ in planned]
        raise ValueError(
            f"offload=True has nothing to offload with {layout.describe()}: the plans of {dits} name no transformer"
            f" blocks (DiTPlan.blocks) and no encoder with layers was found"
            f" ({[p for p, _ in encoders] or 'none'}); declare the blocks in the plan or use offload=False."
        )


def _offload_units(module: nn.Module) -> list[nn.Module]:
    """An encoder's streamed units: its layers (``module_units`` without the module itself, which stays on the
    device)."""
    return [u for u in module_units(module) if u is not module]


def _apply_offload(
    result: Parallelized,
    planned: list[tuple[str, nn.Module, DiTPlan]],
    encoders: list[tuple[str, nn.Module]],
    to_device_on_remove: bool,
) -> None:
    """Stream the blocks of ``planned`` (with the plans' shared modules as units of their own, as FSDP makes them)
    and the layers of ``encoders`` from host memory, one unit at a time."""
    for path, dit, plan in planned:
        blocks = [b for b in block_units(plan.block_lists(dit)) if not isinstance(b, ReleasedBlock)]
        shared = [dit.get_submodule(p) for p in plan.shared_modules]
        if blocks:
            result.applied.append(apply_offload(dit, [*shared, *blocks], to_device_on_remove=to_device_on_remove))
    for _, sub in encoders:
        layers = _offload_units(sub)
        if layers:
            result.applied.append(apply_offload(sub, layers))
    streamed = [path or type(dit).__name__ for path, _, _ in planned] + [path for path, _ in encoders]
    if streamed:
        rank_zero_log(
            f"offload: the blocks and layers of {streamed} stay in host memory, streamed to the device per unit"
        )


def _apply_fsdp(
    result: Parallelized,
    module: nn.Module,
    planned: list[tuple[str, nn.Module, DiTPlan]],
    mesh,
    offload: bool = False,
    fsdp_units: FsdpUnits = "blocks",
) -> bool:
    """FSDP2 per transformer block (``fsdp_units="layers"``: per weight layer too), per weight layer of the DiT root
    (its embedders and output projection: otherwise the root unit, gathered for the whole forward, would hold them
    whole from the first to the last block) and on each DiT root; whether it sharded (not over one rank)."""
    fsdp_mesh = shard_mesh(mesh)
    if fsdp_mesh.size() == 1:
        rank_zero_log("fsdp=True but only one rank computes with each set of weights: nothing to shard.")
        return False
    for path, dit, plan in planned:
        # a pipeline stage has released other stages' blocks: what remains of them (shared modules) goes to the root
        blocks = [b for b in block_units(plan.block_lists(dit)) if not isinstance(b, ReleasedBlock)]
        if not blocks:
            rank_zero_log(f"{path or type(dit).__name__}: the plan names no blocks; FSDP gathers the whole DiT at once")
        # parts of blocks the DiT also calls outside its block loop are units of their own (gathered alone there)
        shared = [dit.get_submodule(p) for p in plan.shared_modules]
        layers = weight_layers(dit, [*shared, *blocks])
        if fsdp_units == "blocks":  # the root's own weight layers still are units: gathered while they run only
            inside = {id(m) for unit in (*shared, *blocks) for m in unit.modules()}
            layers = [m for m in layers if id(m) not in inside]
        units = [*layers, *shared, *blocks, dit]
        result.applied.append(apply_fsdp(dit, units, fsdp_mesh, offload=offload, rows=fsdp_units == "rows"))
    where = " (shards in host memory)" if offload else ""
    rank_zero_log(f"FSDP over {fsdp_mesh.size()} ranks (axes {', '.join(SHARD_AXES)}){where} on {result.paths}")
    return True


def _apply_parallel_vae(result: Parallelized, vaes: list[tuple[str, nn.Module, VaeCut]], mesh) -> None:
    """Banded decode of every VAE over the model-parallel group of this rank's data-parallel index."""
    group = replicated_group(mesh)
    for _, vae, cut in vaes:
        result.applied.append(apply_parallel_vae(vae, cut, group))
    names = [path or type(vae).__name__ for path, vae, _ in vaes]
    rank_zero_log(f"parallel VAE decode over {group.size()} ranks on {names}")


def _apply_pipeline(
    result: Parallelized,
    planned: list[tuple[str, nn.Module, DiTPlan]],
    layout: ParallelLayout,
    mesh,
    options: PipelineOptions,
    shard_root: bool,
) -> None:
    """Stage sharding of the blocks and micro-batch or PipeFusion pipelining over the ``pp`` axis; PipeFusion shards
    each patch over the stage's sequence-parallel ranks itself. ``shard_root``: the weights outside the blocks are
    sharded over the stages between DiT calls too (``pipeline/root_shards.py``)."""
    sequence = SequenceGroups.from_mesh(mesh) if layout.sequence_degree > 1 else None
    for _, dit, plan in planned:
        if sequence is not None and options.mode == "microbatch":
            # sequence parallelism's own checks on the whole model before stages release blocks (installed and removed:
            # pure); on a stage, a pattern may match none of the blocks it holds
            apply_sequence_parallel(dit, plan, sequence).remove()
        pipefusion_sequence = sequence if options.mode == "pipefusion" else None
        result.applied.append(apply_pipeline(dit, plan, options, mesh.get_group("pp"), pipefusion_sequence))
        if shard_root:
            result.applied.append(apply_root_shards(dit, plan, mesh["pp"]))
    root = ", the weights outside the blocks sharded between calls" if shard_root else ""
    rank_zero_log(f"pipeline over {layout.pp} stages ({options.describe()}{root}) on {result.paths}")


def _check_pipeline_with_sequence(
    planned: list[tuple[str, nn.Module, DiTPlan]], layout: ParallelLayout, options: PipelineOptions
) -> None:
    """Pipeline x sequence parallel: every stage must make the plan's cuts (pure check, the same on every rank).

    Cuts at forward arguments (``split_inputs``) and at submodule outputs outside the blocks (``split_outputs``) run
    on every stage. A cut at a block's inputs (``split_module_inputs`` on ``blocks.i``) is made by each stage's
    first block of that list from index ``i`` on, so every stage must own one; a cut inside a block runs on the
    owning stage only and is not supported.
    """
    for path, dit, plan in planned:
        name = f"{type(dit).__name__} ({path or 'the module'})"
        assignment = assign_stages(dit, plan, int(layout.pp), options.layers_per_stage)
        check_cuts_on_every_stage(dit, plan, assignment, f"Pipeline (pp={layout.pp}) with sequence parallelism", name)


def _submodule(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError as exc:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"shard_modules names {path!r}, which is not a submodule of {type(module).__name__} (children: {children})."
        ) from exc
