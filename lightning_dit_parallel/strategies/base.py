"""``DiTParallelStrategy``: the Lightning strategy that runs a planned DiT in parallel under ``Trainer.predict``.

It builds the mesh in ``setup_environment``, applies the parallelizers in ``setup``, hands the data-parallel
rank to the sampler, and in ``teardown`` removes every hook, destroys the process group and restores the
launcher's environment variables, so that another ``predict`` (with any strategy) can follow in the same
process. The named strategies (``SequenceParallelStrategy`` ...) are presets of this one.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin
from lightning.fabric.utilities.distributed import _get_default_process_group_backend_for_device, _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from typing_extensions import override

from lightning_dit_parallel.loading import lean_from_pretrained, materialize, release
from lightning_dit_parallel.parallel.cache import CacheMethod, CacheOptions, StepCacheConfig, cache_config
from lightning_dit_parallel.parallel.compose import Parallelized, parallelize
from lightning_dit_parallel.parallel.composition import check_composition
from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions
from lightning_dit_parallel.parallel.fsdp import FsdpUnits, check_equal_batch_counts, check_fsdp_units, shards_encoders
from lightning_dit_parallel.parallel.guard import CheckInputs, check_inputs_option
from lightning_dit_parallel.parallel.incomplete import unmark_incomplete
from lightning_dit_parallel.parallel.layout import Degree, ParallelLayout
from lightning_dit_parallel.parallel.nodes import (
    CrossNodePolicy,
    CrossNodeWarning,
    check_node_placement,
    is_numbered_by_node,
)
from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions
from lightning_dit_parallel.parallel.regional_compile import CompileOption, check_compile_option
from lightning_dit_parallel.parallel.sequence.backends import LSEFallback
from lightning_dit_parallel.parallel.sequence.ulysses import UlyssesOverlap, check_overlap_option
from lightning_dit_parallel.strategies.environment import restored_environment
from lightning_dit_parallel.strategies.failure import may_gather
from lightning_dit_parallel.strategies.options import (
    PIPELINE_ALIASES,
    AutoOptions,
    auto_options,
    check_options,
    split_aliases,
    with_aliases,
)
from lightning_dit_parallel.strategies.rendezvous import group_store, predict_namespace
from lightning_dit_parallel.strategies.samples import check_samples_cover_groups, checked_source
from lightning_dit_parallel.utils.logging import rank_zero_log
from lightning_dit_parallel.utils.pipelines import AttachedPipelines, attach_pipelines

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]
TBroadcast = TypeVar("TBroadcast")

#: Default time a collective may wait for a peer before every rank fails with an error.
DEFAULT_TIMEOUT = timedelta(minutes=5)

#: Trainer functions the strategy supports: inference only (no gradients are synchronised).
_SUPPORTED_FNS = (TrainerFn.PREDICTING, TrainerFn.VALIDATING, TrainerFn.TESTING)


class _SubprocessLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher that puts the launcher's environment variables back afterwards."""

    def launch(self, function, *args: Any, trainer=None, **kwargs: Any) -> Any:
        with restored_environment():
            return super().launch(function, *args, trainer=trainer, **kwargs)


class _ProcessPoolLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher that puts the launcher's environment variables back afterwards."""

    def launch(self, function, *args: Any, trainer=None, **kwargs: Any) -> Any:
        with restored_environment():
            return super().launch(function, *args, trainer=trainer, **kwargs)


class DiTParallelStrategy(ParallelStrategy):
    """Parallel DiT inference on one device mesh; the product of the degrees must equal the world size.

    Args:
        dp_degree: data-parallel groups (different samples each). One degree may be ``"auto"``; ``dp_degree="auto"``
            yields to another ``"auto"`` degree (it becomes 1; see ``ParallelLayout.requested``).
        cfg_degree: classifier-free-guidance parallel degree (1 or 2).
        pp_degree: pipeline stages: the transformer blocks are cut into this many stages, each rank holds one.
        ulysses_degree: Ulysses sequence-parallel degree.
        ring_degree: ring-attention sequence-parallel degree.
        fsdp: shard parameters with FSDP2, per transformer block, over the ranks that compute with the same
            weights (the dp, cfg, ring and ulysses axes; not pp; with ``tp_degree`` the tensor-parallel shards are
            sharded further, a 2-D layout).
        tp_degree: tensor-parallel degree: the attention heads and MLP features of every block are split over this
            many ranks (torch DTensor column-/row-wise styles, two all-reduces per block); heads must divide by
            ``tp_degree * ulysses_degree``. See ``lightning_dit_parallel.parallel.tensor``.
        pipeline: with ``pp_degree > 1``, the schedule: ``PipelineOptions(mode, num_patches, warmup_steps,
            layers_per_stage, num_microbatches, text_tokens)``; ``mode="microbatch"`` (exact, the default) or
            ``"pipefusion"`` (patches with stale keys/values; approximate). See ``parallel/pipeline/options.py``.
        distrifusion: ``DistriFusionOptions(warmup_steps)``: the ring axis runs DistriFusion (stale keys and values of
            the other patches, approximate) instead of Ring attention (``PatchParallelStrategy`` sets it).
        auto: ``True`` or ``AutoOptions(tokens, height, width, frames, memory, allow_approximate, plan_options)``:
            choose the degrees (and FSDP, the pipeline schedule, the parallel VAE) with the layout planner in
            ``setup_environment``, from the model, the world size and the device memory; leave those arguments at
            their defaults. ``shard_modules`` are sharded when the chosen layout uses FSDP. See ``strategies.auto``
            and ``strategies/options.py``.
        shard_modules: modules of the LightningModule to shard with FSDP besides the DiT (one unit per weight
            layer), e.g. ``["pipe.text_encoder"]``, over every model-parallel rank (and the dp axis with ``fsdp``).
            Default
            ``None``: with ``fsdp``, ``pp_degree > 1`` or ``tp_degree > 1`` (the layouts that cut the DiT's memory)
            every transformers ``PreTrainedModel`` outside the DiT(s), i.e. the pipeline's text and image encoders
            (T5/UMT5, CLIP, Llama, Gemma, Qwen ...), like Wan's ``--t5_fsdp``; ``[]``: none. They must run on every rank
            of the group the same number of times (diffusers pipelines call each encoder once per batch).
        fsdp_units: with ``fsdp``, what a rank gathers at once: ``"auto"`` (the default: ``"rows"``, or ``"layers"``
            with ``tp_degree > 1``), ``"blocks"`` (each transformer block: fewest all-gathers), ``"layers"`` (each
            Linear / convolution / embedding: a lower peak, more and smaller all-gathers) or ``"rows"`` (the layers,
            the Linears never gathered whole: each rank's rows are broadcast in turn and multiplied where they arrive:
            the lowest peak; not with ``tp_degree > 1``). With ``auto=True`` the planner's choice. See
            ``parallelize``.
        offload: keep the weights of the transformer blocks and of the encoders' layers in (pinned) host memory and
            bring each unit to the device for its forward only, for models that do not fit the devices otherwise
            (slower: every step copies the weights from the host). With FSDP the shards live on the host (FSDP2's
            ``CPUOffloadPolicy``); with pipeline stages, tensor parallelism or encoders kept whole each block / layer
            is copied to the device around its forward (``parallel/offload.py``). The DiT's and encoders'
            roots (embeddings, final layers) stay on the device. A ``ValueError`` at setup when there is nothing to
            offload. With ``auto``, ``offload=True`` lets the planner offload, only when no layout fits without it.
        check_inputs: check in the first DiT call of every batch that the ranks of each model-parallel group (cfg,
            pp, ring, ulysses and tp axes) pass the DiT identical arguments, and raise a ``ValueError`` on every rank
            when they do not (e.g. noise drawn from a rank-dependent random state). One small all-gather per batch;
            ``"every_call"``: in every DiT call (also catches per-step noise of a stochastic scheduler); ``False``:
            off. See ``lightning_dit_parallel.parallel.guard``.
        cache: step caching, ``None`` (default), ``"fbcache"`` (First-Block Cache: the first block always runs; the
            other blocks are skipped, their cached residual added, while the first block's output residual changes less
            than the threshold) or ``"teacache"`` (TeaCache-style: skipped while the accumulated relative change of the
            first block's input stays under it). Approximate; one decision per model-parallel group (every rank of a
            sequence / tensor-parallel / CFG group and every pipeline stage takes the same branch). Not with PipeFusion
            or DistriFusion (``ValueError``). See ``lightning_dit_parallel.parallel.cache``.
        cache_threshold: the threshold of ``cache``; ``None``: the method's default (``DEFAULT_THRESHOLDS``: fbcache
            0.2, teacache 0.1); 0 never skips.
        cache_options: ``CacheOptions`` or a dict of them: ``warmup_steps`` (1), ``final_steps`` (1), ``max_skips``
            (None), ``num_steps`` (None: found), ``first_blocks`` (fbcache, 1).
        parallel_vae: decode in bands: every VAE of the module with a cut (diffusers ``AutoencoderKL``,
            ``AutoencoderKLWan``, ... found by class, see ``parallel/vae/``) decodes its latents cut into
            bands along the height over the ranks of each model-parallel group, exactly (halo rows per convolution,
            group-norm statistics reduced over the bands); ``vae.decode(...)`` and pipeline calls are unchanged. The
            encoder stays whole. A module without such a VAE is a ``ValueError`` at setup.
        compile: regional compilation once the DiT is parallelized: ``torch.compile`` on each transformer block of its
            plan (``True``: torch's default backend; or a backend name such as ``"aot_eager"``). See
            ``lightning_dit_parallel.parallel.regional_compile``.
        lse_fallback: Ring/USP with an attention backend chosen by ``set_attention_backend`` that gives no
            log-sum-exp: ``"warn"`` once and run the ring blocks on torch's kernel (default), or ``"error"`` (a
            ``ValueError`` on every rank). See ``lightning_dit_parallel.parallel.sequence.backends``.
        ulysses_overlap: Ulysses attention (ring_degree 1) in head groups whose all-to-alls overlap the attention of
            the others: ``False`` (off), ``True`` (2 groups), an int (that many, at most heads / ulysses_degree), or
            ``"auto"`` (default: what ``bench/ulysses_overlap.py`` measured faster on the device type; off where no
            gain was measured). Exact either way. See ``lightning_dit_parallel.parallel.sequence.ulysses``.
        cross_node: with ``Trainer(num_nodes > 1)``, what to do when a degree puts ranks of one Ulysses group (or
            tensor-parallel group) on different nodes, so that its per-layer all-to-all (all-reduce) crosses the
            network: ``"warn"`` (default) or ``"error"`` (a ``ValueError`` on every rank before any collective). The
            innermost mesh axes are laid out inside a node whenever their degrees fit; see ``nodes.py``.
        process_group_backend: ``"gloo"`` or ``"nccl"``; default: nccl on CUDA, gloo on CPU.
        timeout: how long a collective waits for a peer before raising; a rank that dies makes the others
            fail within this time instead of hanging.
        start_method: ``"popen"`` (Lightning's script launcher, the default: works from scripts and the
            command line), ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        **aliases: the flat names of earlier versions, each filling one field of an option object:
            ``pp_mode`` (``pipeline.mode``), ``num_patches``, ``warmup_steps``, ``layers_per_stage``,
            ``num_microbatches``, ``text_tokens`` (``pipeline``); ``allow_approximate``, ``tokens``, ``height``,
            ``width``, ``frames``, ``memory``, ``plan_options`` (``auto``, with ``auto=True``). ``None`` or the
            field's default counts as not given.

    Raises:
        ValueError: for invalid degrees or options, options that would be ignored, or a layout and options that do not
            compose (``parallel/composition.py``) (at construction), or degrees that do not multiply to the world size
            (in ``setup_environment``, on every rank, before any collective).
        TypeError: for an unknown keyword, or a field given both by an option object and by its alias with different
            values.
    """

    strategy_name = "dit_hybrid"

    def __init__(
        self,
        dp_degree: Degree = 1,
        cfg_degree: Degree = 1,
        pp_degree: Degree = 1,
        ulysses_degree: Degree = 1,
        ring_degree: Degree = 1,
        fsdp: bool = False,
        *,
        tp_degree: Degree = 1,
        pipeline: PipelineOptions | None = None,
        distrifusion: DistriFusionOptions | None = None,
        auto: bool | AutoOptions = False,
        shard_modules: Sequence[str] | None = None,
        offload: bool = False,
        fsdp_units: FsdpUnits = "auto",
        check_inputs: CheckInputs = True,
        cache: CacheMethod | None = None,
        cache_threshold: float | None = None,
        cache_options: CacheOptions | dict[str, Any] | None = None,
        parallel_vae: bool = False,
        compile: CompileOption = False,
        lse_fallback: LSEFallback = "warn",
        ulysses_overlap: UlyssesOverlap = "auto",
        cross_node: CrossNodePolicy = "warn",
        process_group_backend: str | None = None,
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        start_method: StartMethod = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment=None,
        checkpoint_io=None,
        precision_plugin=None,
        **aliases: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._requested_layout = ParallelLayout.requested(
            dp=dp_degree,
            cfg=cfg_degree,
            pp=pp_degree,
            ring=ring_degree,
            ulysses=ulysses_degree,
            tp=tp_degree,
            fsdp=fsdp,
        )
        pipeline_aliases, auto_aliases = split_aliases(type(self).__name__, aliases)
        self._pipeline: PipelineOptions = with_aliases(
            pipeline, PipelineOptions, pipeline_aliases, PIPELINE_ALIASES, "pipeline"
        )
        if distrifusion is not None and not isinstance(distrifusion, DistriFusionOptions):
            raise TypeError(f"distrifusion must be a DistriFusionOptions or None; got {distrifusion!r}.")
        self._distrifusion = distrifusion  # the ring axis runs DistriFusion (PatchParallelStrategy)
        self._auto = auto_options(auto, auto_aliases)
        # None: the default, every transformers encoder when the layout cuts the DiT's memory (fsdp, pp, tp)
        self._shard_modules: tuple[str, ...] | None = None if shard_modules is None else tuple(shard_modules)
        if not isinstance(offload, bool):
            raise ValueError(f"offload must be a bool; got {offload!r}.")
        self._offload = self._offload_requested = offload
        check_fsdp_units(fsdp_units)
        self._fsdp_units: FsdpUnits = fsdp_units
        self._auto_shard_modules: tuple[str, ...] | None = ()
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"start_method must be one of popen, spawn, fork, forkserver; got {start_method!r}.")
        self._start_method: StartMethod = start_method
        self._check_inputs = check_inputs_option(check_inputs)
        check_compile_option(compile)
        if lse_fallback not in ("warn", "error"):
            raise ValueError(f"lse_fallback must be 'warn' or 'error', got {lse_fallback!r}.")
        self._compile: CompileOption = compile
        self._lse_fallback: LSEFallback = lse_fallback
        check_overlap_option(ulysses_overlap)
        self._ulysses_overlap: UlyssesOverlap = ulysses_overlap
        self._cache: StepCacheConfig | None = cache_config(cache, cache_threshold, cache_options)
        if not isinstance(parallel_vae, bool):
            raise ValueError(f"parallel_vae must be a bool; got {parallel_vae!r}.")
        self._parallel_vae = parallel_vae
        if cross_node not in ("warn", "error"):
            raise ValueError(f"cross_node must be 'warn' or 'error'; got {cross_node!r}.")
        self._cross_node: CrossNodePolicy = cross_node
        self._process_group_backend = process_group_backend
        self._timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        self._num_nodes = 1
        self._layout: ParallelLayout | None = None
        self._mesh = None
        self._parallelized: Parallelized | None = None
        self._pipelines: AttachedPipelines | None = None
        self._owns_process_group = False
        self._store: dist.Store | None = None  # keys of this predict alone (strategies/failure.py)
        self._failed = False
        self._undo_sample_check: Callable[[], None] = lambda: None
        # the one cross-check, before the world size is known for every degree that is not "auto" (the layout's
        # composition again once resolved, in setup_environment)
        check_options(
            self._requested_layout,
            pipeline=self._pipeline,
            distrifusion=self._distrifusion,
            auto=self._auto,
            parallel_vae=self._parallel_vae,
            cache=self._cache.method if self._cache is not None else None,
            shard_modules=self._shard_modules,
            ulysses_overlap=self._ulysses_overlap,
        )

    def _composition_options(self) -> dict[str, Any]:
        """The options ``composition.composition_problems`` checks with the layout."""
        return dict(
            pipeline=self._pipeline,
            distrifusion=self._distrifusion is not None,
            cache=self._cache.method if self._cache is not None else None,
            shard_modules=self._shard_modules if self._auto is None else self._auto_shard_modules,
            ulysses_overlap=self._ulysses_overlap,
        )

    def resolve_layout(self, world_size: int) -> ParallelLayout:
        """The requested layout resolved for ``world_size`` ranks and checked for composition, as
        ``setup_environment`` does before any collective (pure computation: the same verdict on every rank).

        Raises:
            ValueError: when the degrees do not multiply to ``world_size`` or the layout and the options do not
                compose (``parallel/composition.py``).
        """
        layout = self._requested_layout.resolve(world_size)
        check_composition(layout, **self._composition_options())
        return layout

    # -- layout and mesh ----------------------------------------------------------------------------------

    @property
    def layout(self) -> ParallelLayout:
        """The resolved layout. Raises ``RuntimeError`` before ``setup_environment`` has run."""
        if self._layout is None:
            raise RuntimeError("The layout is resolved in setup_environment(); it is not available before.")
        return self._layout

    @property
    def device_mesh(self):
        """The named device mesh (axes dp, cfg, pp, ring, ulysses, tp). Raises ``RuntimeError`` before setup."""
        if self._mesh is None:
            raise RuntimeError("Accessing the device mesh before processes have initialized is not allowed.")
        return self._mesh

    # -- Lightning plumbing -------------------------------------------------------------------------------

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def is_distributed(self) -> bool:
        """Tells Lightning to give predict/validate/test dataloaders a distributed sampler (data-parallel ranks)."""
        return True

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Only data-parallel groups see different samples; all ranks of a model-parallel group share batches."""
        mesh = self.device_mesh
        return {"num_replicas": mesh["dp"].size(), "rank": mesh["dp"].get_local_rank()}

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method != "popen" and self.cluster_environment.creates_processes_externally:
            raise ValueError(
                f"start_method={self._start_method!r} starts the ranks itself, but"
                f" {type(self.cluster_environment).__name__} says a launcher (torchrun, srun, ...) already started"
                " them; use start_method='popen' (the default)."
            )
        if self._start_method == "popen":
            if not self.cluster_environment.creates_processes_externally:
                self._launcher = _SubprocessLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _ProcessPoolLauncher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()  # the seed from seed_everything() reaches every rank
        self.set_world_ranks()
        if self._auto is not None:  # the LightningModule is connected before setup_environment (Trainer._run)
            self._choose_layout()
        # Pure validation first: every rank raises the same ValueError before any collective.
        if self.cluster_environment is not None and self.cluster_environment.creates_processes_externally:
            # torchrun / srun started the ranks, so no launcher compared them with Trainer(devices, num_nodes)
            self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        self._layout = self.resolve_layout(self.world_size)
        self._check_node_placement()
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device
        )
        self._owns_process_group = not dist.is_initialized()
        if self._owns_process_group:  # a key namespace of its own in the launcher's store (utils/rendezvous.py)
            store = group_store(self.cluster_environment, self.global_rank, self.world_size, self._timeout)
            _init_dist_connection(
                self.cluster_environment,
                self._process_group_backend,
                self.global_rank,
                self.world_size,
                timeout=self._timeout,
                store=store,
            )
            self._store = store
        else:
            self._store = predict_namespace(self.world_size)
        self._mesh = self._layout.build_mesh(self.root_device.type)
        ranks_per_node = self.num_processes if self.num_nodes > 1 else None
        rank_zero_log(f"{type(self).__name__}: {self._layout.describe(ranks_per_node)} on {self.world_size} ranks")

    def _choose_layout(self) -> None:
        """``auto``: the planner's recommended layout becomes the requested one (pure computation on every rank)."""
        from dataclasses import replace

        from lightning_dit_parallel.strategies.auto import choose_layout, supported_axes

        assert self._auto is not None
        chosen, plan = choose_layout(
            self.lightning_module,
            world_size=self.num_nodes * self.num_processes,
            nodes=self.num_nodes,
            device=self.root_device,
            hints=self._auto,
            axes=replace(supported_axes(type(self), self._auto.allow_approximate), offload=self._offload_requested),
            shard_text_encoders=self._shard_modules is None or bool(self._shard_modules),
            check_inputs=bool(self._check_inputs),
        )
        layout = chosen.layout
        self._requested_layout = layout.to_parallel_layout()
        mode = "pipefusion" if layout.pp_mode == "pipefusion" else "microbatch"
        self._pipeline = PipelineOptions(mode, layout.patches or None, self._pipeline.warmup_steps)
        self._parallel_vae = layout.parallel_vae
        self._offload = layout.offload  # with auto, offload=True allows it where nothing fits without
        if self._fsdp_units == "auto":  # the units the planner's estimate assumed; a requested kind stays
            self._fsdp_units = layout.fsdp_units
        self._auto_shard_modules = self._shard_modules if shards_encoders(layout.fsdp, layout.pp, layout.tp) else ()
        rank_zero_log(
            f"strategy=auto chose {layout.describe()} ({self._requested_layout.describe()}) for {plan.models.dit.name},"
            f" {plan.grid.tokens} tokens, on {self.world_size} ranks: {chosen.reason}"
        )

    def _check_node_placement(self) -> None:
        """With several nodes: warn about (or refuse) Ulysses / tensor-parallel groups that span nodes; warn on a rank
        whose launcher did not number the ranks node by node (the placement assumes it)."""
        if self.num_nodes <= 1:
            return
        layout, ranks_per_node = self.layout, self.num_processes
        if not is_numbered_by_node(self.global_rank, self.node_rank, self.local_rank, ranks_per_node):
            warnings.warn(
                f"Global rank {self.global_rank} is local rank {self.local_rank} of node {self.node_rank}: the launcher"
                f" does not number ranks node by node (node rank * {ranks_per_node} + local rank), so the mesh axes"
                " meant to stay inside a node may cross nodes (with srun use the default block distribution).",
                CrossNodeWarning,
                stacklevel=2,
            )
        degrees = {axis: int(degree) for axis, degree in layout.degrees().items()}
        message = check_node_placement(degrees, ranks_per_node, self._cross_node, layout.describe(ranks_per_node))
        if message is not None:
            rank_zero_warn(message, category=CrossNodeWarning)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn not in _SUPPORTED_FNS:
            raise TypeError(
                f"{type(self).__name__} supports inference (predict, validate, test), not {trainer.state.fn.value}."
            )
        assert self.model is not None and self.accelerator is not None
        self._check_sample_count(trainer)
        self.accelerator.setup(trainer)
        # diffusers pipelines held as attributes join the module tree until teardown (see pipelines.py)
        self._pipelines = attach_pipelines(self.lightning_module, show_progress=self.global_rank == 0)
        self.model = self.precision_plugin.convert_module(self.model)
        shard_modules = self._shard_modules if self._auto is None else self._auto_shard_modules
        # parallelized where the module is (the host, or the meta device for lean-loaded weights), so that a rank
        # drops what it does not keep before anything reaches its device
        self._parallelized = parallelize(
            self.lightning_module,
            self.layout,
            self.device_mesh,
            shard_modules=shard_modules,
            pipeline=self._pipeline,
            check_inputs=self._check_inputs,
            parallel_vae=self._parallel_vae,
            distrifusion=self._distrifusion,
            offload=self._offload,
            fsdp_units=self._fsdp_units,
            cache=self._cache,
            compile=self._compile,
            lse_fallback=self._lse_fallback,
            ulysses_overlap=self._ulysses_overlap,
        )
        # deferred weights (lean from_pretrained, loading.defer_weights): read now, only the parts this rank kept,
        # straight onto its device; then what else the rank keeps moves there
        materialize(self.lightning_module, self.root_device)
        self.model_to_device()
        self.setup_precision_plugin()
        self.barrier()

    def _check_sample_count(self, trainer: pl.Trainer) -> None:
        """Once Lightning has requested the predict dataloaders (before it builds their sampler and before any
        collective), require a sample for every data-parallel group; see ``strategies.samples``."""
        dp = int(self.layout.dp)
        sharded = getattr(trainer._accelerator_connector, "use_distributed_sampler", True)
        if dp == 1 or trainer.state.fn != TrainerFn.PREDICTING or not sharded:
            return
        describe = self.layout.describe()
        self._undo_sample_check = checked_source(
            getattr(trainer.predict_loop, "_data_source", None),
            lambda loaders: check_samples_cover_groups(loaders, dp, describe),
        )

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``configure_model`` builds on the host, not on the rank's device: ``setup`` parallelizes there and moves
        only what the rank keeps (Lightning's default would build the whole model on every device first)."""
        with self.precision_plugin.tensor_init_context():
            yield

    @override
    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """Inside ``configure_model``, diffusers' and transformers' ``from_pretrained`` load lean: the model is built
        on the meta device and each rank reads from the safetensors files only what it keeps, after parallelization
        (``loading.pretrained``). ``self.pipe = WanPipeline.from_pretrained(path)`` there never holds the whole
        model."""
        with lean_from_pretrained():
            yield

    @override
    def process_dataloader(self, dataloader: object) -> object:
        # FSDP all-gathers over the dp axis too: every data-parallel group must run as many batches.
        if self._layout is not None and self._layout.fsdp and int(self._layout.dp) > 1:
            check_equal_batch_counts(dataloader, self.device_mesh.get_group("dp"), self.root_device)
        return dataloader

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        # parameters still on the meta device (deferred loading) get their storage after parallelization
        self.model._apply(lambda t: t if t.is_meta else t.to(self.root_device))

    @override
    def barrier(self, name: str | None = None) -> None:
        if not dist.is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor: torch.Tensor | Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        from lightning.fabric.utilities.distributed import _sync_ddp_if_available

        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        self.begin_batch()
        output = super().predict_step(*args, **kwargs)
        self.end_batch()
        return output

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self.begin_batch()
        output = super().validation_step(*args, **kwargs)
        self.end_batch()
        return output

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self.begin_batch()
        output = super().test_step(*args, **kwargs)
        self.end_batch()
        return output

    def step_cache_stats(self) -> list:
        """With ``cache``: this rank's ``CacheStats`` of the current batch, one per DiT (``[]`` without caching)."""
        applied = self._parallelized.applied if self._parallelized is not None else []
        return [item.stats for item in applied if hasattr(item, "stats") and hasattr(item, "skipped_output")]

    def begin_batch(self) -> None:
        """Stateful parallelizers (PipeFusion's key/value caches and step count) start afresh. Called before every
        predict, validation and test step; call it between denoising loops that one step runs on equally shaped
        inputs."""
        if self._parallelized is not None:
            self._parallelized.begin_batch()

    def end_batch(self) -> None:
        """Parallelizers that check a whole batch's DiT calls (CFG parallel's call pattern) raise here when it cannot be
        served. Called after every predict, validation and test step."""
        if self._parallelized is not None:
            self._parallelized.end_batch()

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Lightning calls this on the rank whose predict raised, before ``teardown``: the parallelizers are then
        removed with collectives only if every rank reaches teardown (``strategies/failure.py``)."""
        self._failed = True
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        # The process group and Lightning's state go even when removing the parallelizers fails (FSDP's removal
        # all-gathers: a dead peer makes it raise), so that another predict can follow in this process.
        failed, self._failed = self._failed, False
        try:
            if self._parallelized is not None:
                parallelized, self._parallelized = self._parallelized, None
                world = self.world_size if dist.is_initialized() else 1
                if not parallelized.removal_needs_peers or may_gather(self._store, world, failed):
                    parallelized.remove()
                else:  # a peer is dead or inside another collective: no collective now (incomplete.py)
                    parallelized.discard()
        finally:
            if self._lightning_module is not None:
                # deferred weights go back to the meta device, to be read again by the next setup (never gathered);
                # a discard's incomplete mark does not hold for them
                for module in release(self._lightning_module):
                    unmark_incomplete(module)
            self._store = None
            self._undo_sample_check()
            self._undo_sample_check = lambda: None
            if self._pipelines is not None:
                self._pipelines.detach()
                self._pipelines = None
            self._mesh = None
            if self._owns_process_group and dist.is_initialized():
                dist.destroy_process_group()
            self._owns_process_group = False
            self._teardown_lightning()
            # The process groups of this predict are kept alive by reference cycles (hook closures, the mesh) until
            # the cyclic collector runs: collect now, so their sockets and threads close with the strategy and
            # many predicts in one process hold no more than one (measured in tests/test_soak.py).
            gc.collect()

    def _teardown_lightning(self) -> None:
        """Lightning's teardown, except that the module moves to the CPU around the meta tensors that a discarded
        parallelizer left (``Module.cpu()`` cannot copy them)."""
        module = self._lightning_module
        if module is not None:
            module._apply(lambda t: t if t.is_meta else t.cpu())
            for part in module.modules():  # what LightningModule.cpu() records besides moving the tensors
                if isinstance(part, _DeviceDtypeModuleMixin):
                    part._device = torch.device("cpu")
        self._lightning_module = None  # Lightning's teardown moves a module it sees with .cpu()
        try:
            super().teardown()
        finally:
            self._lightning_module = module

    @classmethod
    def registered_names(cls) -> dict[str, tuple[str, dict[str, Any]]]:
        """The names this class registers for ``Trainer(strategy="...")``: name -> (description, arguments).

        The hybrid strategy registers ``strategy_name`` and ``dit_auto`` (``auto=True``); presets override this with
        their own names.
        """
        names = {cls.strategy_name: (cls.__doc__.splitlines()[0], {})}
        if cls.strategy_name == "dit_hybrid":
            names["dit_auto"] = ("Parallel DiT inference in the layout the planner chooses", {"auto": True})
        return names

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, (description, arguments) in cls.registered_names().items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, **arguments)
