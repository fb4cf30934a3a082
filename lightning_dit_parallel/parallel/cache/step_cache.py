"""``StepCache``: skip the transformer blocks of a denoising step when the model's output would barely change,
installed on one DiT with hooks (the DiT's forward is not changed; each block's ``forward`` is replaced by an
instance attribute that runs the block, or, in a skipped step, returns its inputs carried forward).

Per pass (one DiT call; one micro-batch under micro-batch pipelining) on every rank:

1. the rank's first block starts the pass (a pre-hook ahead of every other): the step's state is found by cache
   context (diffusers' ``cache_context("cond")`` ...) and pass index; a later pipeline stage receives the decision
   from the stage before (``decision.DecisionLink``);
2. the first stage decides (``decision.py``): fbcache after its first block(s) ran, teacache inside the first block at
   its first attention call, from the timestep-modulated input (``teacache.py``; a skipped step stops the first block
   there); the statistic is all-reduced over the ranks that must agree, so all take the same branch;
3. in a computed step every skippable block runs, and each run of consecutive skippable blocks of one list records
   its residual (its last output minus its first input, per carried tensor); in a skipped step those blocks return
   their inputs carried forward and the last of each run adds the run's residual. The skipped blocks are still
   *called*, so the hooks of every other parallelizer on them run as usual (a pipeline stage receives and sends its
   activations, the sequence cut points run): the collectives are the same in both branches; only the blocks' own
   computation and the collectives inside it (attention all-to-alls, tensor-parallel all-reduces) are skipped, which
   is why their groups must decide together. The hooks that only bring a block's weights in and out (FSDP's
   all-gather and free, offload's copies) run only when the block computes (``weight_gate.py``): all ranks of an FSDP
   group decide together, so all of them leave the same gathers out.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.cache.blocks import (
    BlockInfo,
    block_infos,
    carried,
    flatten_call,
    inherit_mapping,
    learn_mapping,
)
from lightning_dit_parallel.parallel.cache.decision import (
    DecisionLink,
    PaddingRows,
    absolute_sums,
    mean_relative_change,
    reduce_sums,
    relative_change,
)
from lightning_dit_parallel.parallel.cache.options import StepCacheConfig
from lightning_dit_parallel.parallel.cache.teacache import SkipFirstBlock, attention_modules, modulated_input, rescaled
from lightning_dit_parallel.parallel.cache.weight_gate import WeightGate
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.utils.hooks import WeightHooks, remove_handles
from lightning_dit_parallel.utils.logging import rank_zero_log

_MISSING = object()


@dataclass
class _Segment:
    """A run of consecutive skippable blocks of one list and its residual (aligned with the last block's output
    leaves; ``None`` where that leaf is not a tensor)."""

    first: int
    last: int
    residual: list[Tensor | None]


@dataclass
class _Open:
    """The run being recorded in a computed pass: its first block's argument leaves and structure."""

    first: int
    last: int
    inputs: list
    spec: pytree.TreeSpec


@dataclass
class _State:
    """What one cache context and pass index keeps across the steps of a batch."""

    steps: int = 0
    skips_in_row: int = 0
    computed: int = 0  # passes that ran every block
    previous: list[Tensor] | None = (
        None  # fbcache: the deciding residual of the last computed step; teacache: the last modulated input
    )
    accumulated: float = 0.0
    segments: dict[int, _Segment] = field(default_factory=dict)  # by first block index
    member: dict[int, int] = field(default_factory=dict)  # block index -> first block index of its segment
    signature: tuple | None = None  # shapes of the first block's tensor arguments

    def nbytes(self) -> int:
        tensors = [*(self.previous or [])]
        tensors += [r for s in self.segments.values() for r in s.residual if r is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CacheStats:
    """Counts of the current batch on this rank (equal on every rank of a model-parallel group)."""

    steps: int = 0  # passes (DiT calls; micro-batches count one each)
    skipped_steps: int = 0
    skipped_block_calls: int = 0
    skipped_by_context: dict[str | None, int] = field(default_factory=dict)  # by diffusers cache context ("cond" ...)
    cached_bytes: int = 0  # the most this rank held in residuals and previous statistics inputs
    #: per decided step on the first stage: (this rank's sums, the group's reduced sums, the change compared), for
    #: diagnosis (e.g. what each shard alone would have decided: its own sums)
    decisions: list[tuple[list[float], list[float], float]] = field(default_factory=list)


class StepCache:
    """Step caching installed on one DiT (see the module docstring). Build with ``apply_step_cache``.

    Args:
        model: the DiT.
        plan: its plan (``blocks`` names the block lists).
        config: method, threshold and schedule.
        group: the ranks that must take the same branch (sequence, tensor-parallel and CFG ranks of this rank's stage
            and data-parallel index); ``None``: this rank alone.
        link: with pipeline stages, the decision's way down the stages; ``None`` without.
        steps_source: an object whose ``num_inference_steps`` gives the steps per batch when the options and the
            diffusers cache context do not (the LightningModule).
        weight_hooks: a block's weight hooks (``utils.hooks.WeightHooks``: FSDP's gathers, offload's copies), run only
            when the block computes (``weight_gate.py``); ``None``: none.
        separate_group, separate_calls: with CFG parallel, the deciding ranks without the cfg axis and whether the
            current call is one of separate (conditional, unconditional) calls, each computed by one cfg rank
            (``CFGParallel.separate_calls``): then each rank's call decides with its own sequence / tensor-parallel
            ranks only, as each diffusers cache context ("cond", "uncond") decides alone in one process.
        padding_rows: with sequence parallelism, where a tensor of this rank holds padding tokens
            (``SequenceParallel.padding_rows``), left out of the statistic; ``None``: no padding.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: DiTPlan,
        config: StepCacheConfig,
        group: ProcessGroup | None = None,
        link: DecisionLink | None = None,
        steps_source: object | None = None,
        weight_hooks: Callable[[nn.Module], list[WeightHooks]] | None = None,
        separate_group: ProcessGroup | None = None,
        separate_calls: Callable[[], bool] | None = None,
        padding_rows: Callable[[Tensor], PaddingRows] | None = None,
    ) -> None:
        self.model = model
        self.plan = plan
        self.config = config
        self.group = group
        self._separate_group = separate_group
        self._separate_calls = separate_calls
        self._padding_rows = padding_rows
        self._weight_hooks = weight_hooks
        self._gates: dict[int, WeightGate] = {}  # by block index
        self.link = link
        self.steps_source = steps_source
        head = config.options.first_blocks if config.method == "fbcache" else 0
        self.head = head
        self.infos = block_infos(model, plan, head)
        self.by_index = {info.index: info for info in self.infos}
        self.first_stage = link is None or link.link.is_first
        first = self.infos[0] if self.infos and self.infos[0].index == 0 else None
        self._probes: list[nn.Module] = []  # teacache: the first block's attention modules (``teacache.py``)
        if config.method == "teacache" and first is not None and self.first_stage:
            self._probes = attention_modules(model, plan, first.path)
            if not self._probes:
                rank_zero_log(
                    f"step cache: teacache finds none of the plan's attention modules in {first.path}, so it decides"
                    " from the block's own arguments, not the timestep-modulated input."
                )
        self._in_first_block = False
        self.stats = CacheStats()
        self._totals, self._batches = CacheStats(), 0  # over the batches of a predict, for its summary
        self._handles: list[RemovableHandle] = []
        self._forwards: list[tuple[nn.Module, object]] = []
        self._context_method: object = _MISSING
        self._wrapped_context = False
        self._states: dict[tuple, _State] = {}
        self._context: tuple[str | None, int | None] = (None, None)
        self._warned_steps = False
        self._reset_pass()
        self.in_call = False

    # -- install / remove -----------------------------------------------------------------------------------

    def install(self) -> StepCache:
        self._handles.append(self.model.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end_call, always_call=True))
        if self.infos:
            first = self.infos[0].block  # this rank's first block: a pass starts there
            self._handles.append(first.register_forward_pre_hook(self._begin_pass, with_kwargs=True, prepend=True))
        for info in self.infos:
            self._handles.append(info.block.register_forward_pre_hook(self._make_pre(info), with_kwargs=True))
            self._handles.append(info.block.register_forward_hook(self._make_post(info), with_kwargs=True))
            self._forwards.append((info.block, info.block.__dict__.get("forward", _MISSING)))
            info.block.forward = _BlockForward(self, info, info.block.forward)
            hooks = self._weight_hooks(info.block) if self._weight_hooks and info.skippable else []
            gate = WeightGate(info.block, hooks)
            if gate:
                self._gates[info.index] = gate.install()
        if self._probes:  # teacache: decide at the first block's first attention, from its modulated input
            for module in self._probes:
                self._handles.append(module.register_forward_pre_hook(self._probe, with_kwargs=True, prepend=True))
        if "cache_context" in dir(self.model):  # diffusers models: pipelines name their calls ("cond", "uncond")
            self._context_method = self.model.__dict__.get("cache_context", _MISSING)
            self.model.cache_context = self._cache_context(self.model.cache_context)
            self._wrapped_context = True
        return self

    def remove(self) -> None:
        """Take every hook off and give the blocks their forward back; forget the cached tensors."""
        self._log_stats(final=True)
        remove_handles(self._handles)
        for gate in self._gates.values():
            gate.remove()
        self._gates.clear()
        for block, previous in self._forwards:
            if previous is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
        self._forwards.clear()
        if self._wrapped_context:
            if self._context_method is _MISSING:
                self.model.__dict__.pop("cache_context", None)
            else:
                self.model.cache_context = self._context_method
            self._context_method, self._wrapped_context = _MISSING, False
        if self.link is not None:
            self.link.drop()
        self._states.clear()

    def begin_batch(self) -> None:
        """A new batch: the cached residuals, statistics and counts start afresh (the previous batch's are logged)."""
        self._log_stats()
        self._states.clear()
        for info in self.infos:  # learned again in the first step (the calls may differ from batch to batch)
            info.mapping = info.args_spec = info.out_spec = None
            info.constants = {}
        self.stats = CacheStats()

    def _log_stats(self, final: bool = False) -> None:
        """Each batch's counts at DEBUG level as the batch ends; at ``remove`` (the end of the predict) the totals
        over its batches at INFO level, once."""
        stats, totals = self.stats, self._totals
        if stats.steps:
            self._batches += 1
            totals.steps += stats.steps
            totals.skipped_steps += stats.skipped_steps
            totals.skipped_block_calls += stats.skipped_block_calls
            totals.cached_bytes = max(totals.cached_bytes, stats.cached_bytes)
            rank_zero_log(self._describe(stats, 1), logging.DEBUG)
        if final and self._batches:
            rank_zero_log(self._describe(totals, self._batches))
            self._totals, self._batches = CacheStats(), 0

    def _describe(self, stats: CacheStats, batches: int) -> str:
        return (
            f"step cache ({self.config.describe()}) on {type(self.model).__name__}: {batches} batch(es), skipped"
            f" {stats.skipped_steps} of {stats.steps} steps ({stats.skipped_block_calls} block calls); cached"
            f" residuals at most {stats.cached_bytes / 2**20:.2f} MiB on rank 0"
        )

    def cached_bytes(self) -> int:
        """Bytes this rank holds in cached residuals and statistics inputs now."""
        return sum(state.nbytes() for state in self._states.values())

    # -- per call / per pass ------------------------------------------------------------------------------

    def _begin_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = self._block_indexed(args, kwargs)
        if given:
            raise ValueError(
                f"Step caching ({self.config.method}) skips transformer blocks, but {type(module).__name__} got"
                f" {given}, which the block loop adds per block (e.g. ControlNet residuals); use cache=None for such"
                " calls."
            )
        self.in_call = True
        self.pass_index = -1

    def _end_call(self, module: nn.Module, args: tuple, output):
        self.in_call = False
        self._reset_pass()
        if self.link is not None:
            self.link.wait()
        return output

    def _reset_pass(self) -> None:
        self.state: _State | None = None
        self.step = 0
        self.skip: bool | None = None
        self._open: dict[int, _Open | None] = {}
        self._last: dict[int, tuple[BlockInfo, list, list, pytree.TreeSpec]] = {}
        self._pending: dict[int, tuple[BlockInfo, list, list, pytree.TreeSpec]] = {}
        self._head_inputs: list | None = None
        self._head_pending: tuple[list, list, pytree.TreeSpec] | None = None

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.in_call:
            return
        self.pass_index += 1
        in_call, pass_index = self.in_call, self.pass_index
        self._reset_pass()
        self.in_call, self.pass_index = in_call, pass_index
        leaves, _ = flatten_call(args, kwargs)
        signature = tuple(tuple(x.shape) for x in leaves if isinstance(x, Tensor))
        key = (self._context[0], pass_index)
        state = self._states.get(key)
        if state is None or state.signature != signature:  # a new batch shape: nothing cached applies
            state = self._states[key] = _State(signature=signature)
        self.state, self.step = state, state.steps
        state.steps += 1
        self.stats.steps += 1
        if not self.first_stage:
            assert self.link is not None
            self._decided(self.link.receive(_device(leaves)))

    def _forced(self) -> bool:
        """Whether this step runs every block whatever the statistic (the same verdict on every rank)."""
        state, options = self.state, self.config.options
        assert state is not None
        total = options.num_steps or self._context[1] or _steps_of(self.steps_source)
        if total is None and options.final_steps and not self._warned_steps:
            self._warned_steps = True
            rank_zero_log(
                f"step cache: the number of steps is unknown, so final_steps={options.final_steps} cannot"
                " apply; give cache_options={'num_steps': ...}."
            )
        return (
            self.step < options.warmup_steps
            or (total is not None and self.step >= total - options.final_steps)
            or (options.max_skips is not None and state.skips_in_row >= options.max_skips)
            or state.previous is None
            or state.computed == 0
        )

    def _decide(self, current: list[Tensor], device: torch.device) -> bool:
        """The branch of this step from the statistic's tensors, reduced over the group (first stage only)."""
        state = self.state
        assert state is not None
        forced = self._forced()
        skip = False
        if not forced:
            rows = [self._padding_rows(t) for t in current] if self._padding_rows is not None else None
            local = absolute_sums(current, state.previous, rows).to(device)
            separate = self._separate_calls is not None and self._separate_calls()
            sums = reduce_sums(local.clone(), self._separate_group if separate else self.group).cpu()
            change = relative_change(sums) if self.config.method == "fbcache" else mean_relative_change(sums)
            self.stats.decisions.append((local.cpu().tolist(), sums.tolist(), change))
        if self.config.method == "fbcache":
            if not forced:
                skip = change < self.config.threshold
            if not skip:
                state.previous = [t.detach() for t in current]
        else:
            if not forced:
                state.accumulated += rescaled(change, self.config.options.rescale)
                skip = state.accumulated < self.config.threshold
            if not skip:
                state.accumulated = 0.0
            state.previous = [t.detach().clone() for t in current]
        if self.link is not None:
            self.link.send(skip, device)
        self._decided(skip)
        return skip

    def _decided(self, skip: bool) -> None:
        state = self.state
        assert state is not None
        self.skip = skip
        if skip:
            state.skips_in_row += 1
            self.stats.skipped_steps += 1
            context = self._context[0]
            self.stats.skipped_by_context[context] = self.stats.skipped_by_context.get(context, 0) + 1
        else:
            state.skips_in_row = 0
            state.computed += 1

    # -- per block ----------------------------------------------------------------------------------------

    def _make_pre(self, info: BlockInfo):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            decide(args, kwargs)
            gate = self._gates.get(info.index)
            if gate is not None:  # the step's branch is known now: bring the weights in only to compute
                return gate.begin(not self.skips(info), args, kwargs)
            return None

        def decide(args: tuple, kwargs: dict) -> None:
            if self.state is None:
                return
            leaves, spec = flatten_call(args, kwargs)
            if info.index == 0:
                self._in_first_block = True
            if self.skip is None and self.config.method == "teacache" and info.index == 0 and not self._probes:
                tensors = [x for x in leaves if isinstance(x, Tensor) and x.is_floating_point()]  # the fallback
                self._decide(tensors, tensors[0].device)
            if self.skip:
                return
            self._learn(info, leaves, spec)
            if self.config.method == "fbcache" and info.index == 0:
                self._head_inputs = leaves

        return pre

    def _make_post(self, info: BlockInfo):
        def post(module: nn.Module, args: tuple, kwargs: dict, output):
            if info.index == 0:
                self._in_first_block = False
            if self.state is not None and self.skip is None and self.config.method == "teacache" and info.index == 0:
                self._decide_unready(_device(pytree.tree_leaves(output)))  # no attention ran: a computed step
            if self.state is None or self.skip:
                return
            leaves, spec = flatten_call(args, kwargs)
            outputs, out_spec = pytree.tree_flatten(output)
            info.args_spec = spec
            if self.config.method == "fbcache" and info.index == self.head - 1:
                self._decide_after_head(info, leaves, outputs, out_spec)
            if not info.skippable:
                self._open[info.list_index] = None
            elif info.mapping is None and not self._inherit(info, leaves, outputs, out_spec):
                self._pending[info.list_index] = (info, leaves, outputs, out_spec)
            else:
                self._record(info, leaves, outputs)
            self._last[info.list_index] = (info, leaves, outputs, out_spec)
            return

        return post

    def _probe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """teacache, at an attention call inside the first block: the first decides from its modulated input; a
        skipped step stops the first block here (``teacache.SkipFirstBlock``)."""
        if self.state is None or self.skip is not None or not self._in_first_block:
            return
        current = modulated_input(args, kwargs)
        if current is None:
            self._decide_unready(_device(pytree.tree_leaves((args, kwargs))))
            return
        if self._decide([current], current.device) and self.skips(self.by_index[0]):
            raise SkipFirstBlock

    def _learn(self, info: BlockInfo, leaves: list, spec: pytree.TreeSpec) -> None:
        """At a block's call in a computed pass: learn the mapping of the block called before it in the list, and
        record what waited for it."""
        last = self._last.get(info.list_index)
        if last is None:
            return
        previous, previous_args, outputs, out_spec = last
        if previous.mapping is None:
            learn_mapping(previous, previous_args, outputs, out_spec, leaves, spec)
        pending = self._pending.pop(info.list_index, None)
        if pending is not None:
            if pending[0].mapping is not None:
                self._record(pending[0], pending[1], pending[2])
            else:
                self._open[info.list_index] = None
        if self._head_pending is not None and previous.index == self.head - 1 and previous.mapping is not None:
            self._head_residual_for_next(previous)

    def _inherit(self, info: BlockInfo, leaves: list, outputs: list, out_spec: pytree.TreeSpec) -> bool:
        before = self.by_index.get(info.index - 1)
        return (
            before is not None
            and before.list_index == info.list_index
            and inherit_mapping(info, before, leaves, outputs, out_spec)
        )

    def _record(self, info: BlockInfo, leaves: list, outputs: list) -> None:
        """A skippable block ran in a computed pass: extend (or start) its list's run and update the run's residual."""
        state = self.state
        assert state is not None and info.mapping is not None
        run = self._open.get(info.list_index)
        if run is None or run.last != info.index - 1 or run.spec != info.args_spec:
            run = _Open(info.index, info.index, leaves, info.args_spec)
            self._open[info.list_index] = run
        run.last = info.index
        # residual per carried tensor: (last output) - (first input), both of this rank's shard
        residual = [None if p is None else (outputs[j] - run.inputs[p]).detach() for j, p in enumerate(info.mapping)]
        state.segments[run.first] = _Segment(run.first, run.last, residual)
        for index in range(run.first, run.last + 1):
            state.member[index] = run.first
        self.stats.cached_bytes = max(self.stats.cached_bytes, self.cached_bytes())

    def _decide_after_head(self, info: BlockInfo, leaves: list, outputs: list, out_spec: pytree.TreeSpec) -> None:
        """fbcache: the first blocks ran; their output residual decides the rest of the step."""
        residual = self._head_residual(info, outputs)
        if residual is None:  # the mapping is learned at the next block's call: keep the step computed
            self._head_pending = (leaves, outputs, out_spec)
            self._decide_unready(_device(outputs))
            return
        self._decide(residual, residual[0].device)

    def _head_residual(self, info: BlockInfo, outputs: list) -> list[Tensor] | None:
        inputs = self._head_inputs
        if info.mapping is None or inputs is None or self.by_index[0].args_spec != info.args_spec:
            return None
        return [outputs[j] - inputs[p] for j, p in enumerate(info.mapping) if p is not None]

    def _head_residual_for_next(self, info: BlockInfo) -> None:
        """The head's mapping was learned after this step's decision: its residual becomes the reference."""
        assert self._head_pending is not None and self.state is not None
        _, outputs, _ = self._head_pending
        self._head_pending = None
        residual = self._head_residual(info, outputs)
        if residual is not None:
            self.state.previous = [t.detach() for t in residual]

    def _decide_unready(self, device: torch.device) -> None:
        """A computed step whose statistic cannot be formed yet (the first step of a batch)."""
        if self.link is not None:
            self.link.send(False, device)
        self._decided(False)

    def skipped_output(self, info: BlockInfo, args: tuple, kwargs: dict):
        """The output of a skipped block: its inputs carried forward, plus the run's residual at the run's last
        block."""
        state = self.state
        assert state is not None and info.mapping is not None and info.out_spec is not None
        leaves, _ = flatten_call(args, kwargs)
        outputs = carried(info, leaves)
        segment = state.segments[state.member[info.index]]
        if segment.last == info.index:
            outputs = [o if r is None else o + r for o, r in zip(outputs, segment.residual)]
        self.stats.skipped_block_calls += 1
        return pytree.tree_unflatten(outputs, info.out_spec)

    def skips(self, info: BlockInfo) -> bool:
        """Whether ``info``'s block is skipped in this pass."""
        return (
            bool(self.skip) and self.state is not None and info.index in self.state.member and info.mapping is not None
        )

    # -- helpers ------------------------------------------------------------------------------------------

    def _block_indexed(self, args: tuple, kwargs: dict) -> list[str]:
        names = self.plan.block_indexed_inputs
        if not names:
            return []
        try:
            bound = inspect.signature(type(self.model).forward.__get__(self.model)).bind_partial(*args, **kwargs)
        except TypeError:
            return []
        return [n for n in names if bound.arguments.get(n) is not None]

    def _cache_context(self, method):
        """Wrap diffusers' ``model.cache_context(name, **fields)``: the name keys the state, ``num_inference_steps``
        gives the number of steps; diffusers' own cache hooks still get the context."""

        @contextmanager
        def cache_context(name: str, **kwargs):
            saved = self._context
            steps = kwargs.get("num_inference_steps")
            self._context = (name, steps if isinstance(steps, int) else None)
            try:
                with method(name, **kwargs):
                    yield
            finally:
                self._context = saved

        return cache_context


class _BlockForward:
    """A block's ``forward`` while step caching is installed: the block's own forward, or its skipped output."""

    def __init__(self, cache: StepCache, info: BlockInfo, forward) -> None:
        self.cache = cache
        self.info = info
        self.forward = forward
        self.__wrapped__ = forward  # inspect.signature(block.forward) still shows the block's arguments

    def __call__(self, *args, **kwargs):
        if self.cache.skips(self.info):
            return self.cache.skipped_output(self.info, args, kwargs)
        try:
            return self.forward(*args, **kwargs)
        except SkipFirstBlock:  # teacache decided inside the first block (``teacache.py``)
            return self.cache.skipped_output(self.info, args, kwargs)


def _device(leaves: list) -> torch.device:
    return next((x.device for x in leaves if isinstance(x, Tensor)), torch.device("cpu"))


def _steps_of(source: object) -> int | None:
    steps = getattr(source, "num_inference_steps", None)
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None
