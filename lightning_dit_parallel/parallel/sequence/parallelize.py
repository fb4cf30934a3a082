"""Install sequence parallelism on a DiT with hooks, following its plan; ``remove()`` undoes it.

The DiT's own forward is not changed. Hooks:

* a pre-hook on the DiT starts a fresh ``ShardingState`` and cuts the plan's ``split_inputs``;
* pre-hooks on submodules cut the plan's ``split_module_inputs``;
* forward hooks cut the outputs of ``split_outputs`` modules and gather those of ``gather_outputs``;
* pre-hooks at every call cut ``split_module_inputs_each_call`` and gather ``gather_module_inputs``
  (``module_inputs.py``); replicated-tail attention modules get the kernel of ``replicated_tail.py``;
* every self-attention module of the plan has its attention routed to the sequence-parallel kernel for the
  duration of its forward, in this thread only (``utils/attention_route.py``: through diffusers' dispatcher, whose
  backend the user chose with ``set_attention_backend`` then runs the local attention, see ``backends.py``; or
  ``F.scaled_dot_product_attention`` called directly). A key-padding ``attn_mask`` the model
  passes is gathered over the shards, see ``masks.py``. Cross-attention modules keep
  the local kernel: their queries are sharded, their keys and values (text) are replicated;
* around every linear-attention module, its sums over key tokens are all-reduced (``linear_attention.py``);
* token-grid modules (convolutions over the sharded tokens) run on a window with a halo (``token_grid.py``).

Other parallelizers reuse these hooks with their own attention kernel (``attention=``: DistriFusion's stale
keys/values) or their own per-forward state (``per_forward=False``: PipeFusion starts a state per patch with
``begin``/``end`` and cuts every sequence to its patch before sharding it).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.sequence.attention import sequence_parallel_attention, unsupported_sdpa_arguments
from lightning_dit_parallel.parallel.sequence.backends import LSEFallback, check_backend
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.head_parallel import (
    check_head_parallel,
    head_parallel_modules,
    install_head_parallel,
)
from lightning_dit_parallel.parallel.sequence.linear_attention import install_linear_attention
from lightning_dit_parallel.parallel.sequence.masks import shard_key_masks
from lightning_dit_parallel.parallel.sequence.module_inputs import (
    holds_released_blocks,
    install_module_input_hooks,
    module_input_hooks,
)
from lightning_dit_parallel.parallel.sequence.replicated_tail import replicated_tail_hooks
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.parallel.sequence.token_grid import TokenGridHooks, check_callers
from lightning_dit_parallel.parallel.sequence.ulysses import (
    UlyssesOverlap,
    check_heads,
    check_overlap_option,
    overlap_head_groups,
)
from lightning_dit_parallel.plan import DiTPlan, Split, SplitSpec, module_paths
from lightning_dit_parallel.plan.splits import LengthFn, as_tensor, cut_arguments, cut_value
from lightning_dit_parallel.utils.attention_route import route_attention_during_forward
from lightning_dit_parallel.utils.hooks import remove_handles

#: require_state(where) -> the sharding state of the forward in progress (raises outside one).
StateFn = Callable[[str], ShardingState]

#: attention(path, order, require_state) -> the kernel that replaces ``F.scaled_dot_product_attention`` inside the
#: self-attention module at ``path`` (over the sequences ``order``), with SDPA's signature; default: Ulysses/Ring.
AttentionFactory = Callable[[str, tuple[str, ...], StateFn], Callable]


@dataclass
class SequenceParallel:
    """Sequence parallelism installed on one DiT. Call ``remove()`` to restore the plain model."""

    model: nn.Module
    plan: DiTPlan
    groups: SequenceGroups
    signature: inspect.Signature
    handles: list[RemovableHandle] = field(default_factory=list)
    state: ShardingState | None = None
    attention: AttentionFactory | None = None
    lse_fallback: LSEFallback = "warn"
    ulysses_overlap: UlyssesOverlap = "auto"

    def remove(self) -> None:
        remove_handles(self.handles)
        self.state = None

    def begin(self, state: ShardingState, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Start a forward of the DiT with ``state`` (every hook cuts and gathers through it) and cut the plan's
        ``split_inputs`` of the forward's arguments. Called by the DiT's pre-hook, or by the caller that installed
        the hooks with ``per_forward=False`` (then ``end()`` after the forward)."""
        self.state = state
        where = type(self.model).__name__
        return cut_arguments(self.signature, self.plan.split_inputs, args, kwargs, state.split, where, lengths(state))

    def end(self) -> None:
        """The forward is over: hooks that run outside one raise."""
        self.state = None

    def padding_rows(self, x: Tensor) -> tuple[int, int] | None:
        """Where this rank's shard ``x`` holds padding tokens in the forward in progress
        (``ShardingState.padding_rows``: ``(dim, real)``); ``None`` when it holds none, or outside a forward."""
        return None if self.state is None else self.state.padding_rows(x)

    # -- hooks ------------------------------------------------------------------------------------------

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return self.begin(ShardingState(self.groups), args, kwargs)

    def _end_forward(self, module: nn.Module, args: tuple, output):
        self.end()
        return output

    def _split_module_inputs(self, path: str, signature: inspect.Signature, specs: Mapping[str, SplitSpec]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            state = self._require_state(path)
            return cut_arguments(signature, specs, args, kwargs, state.split, path, lengths(state))

        return hook

    def _split_output(self, path: str, spec: SplitSpec):
        def hook(module: nn.Module, args: tuple, output):
            state = self._require_state(path)
            return cut_value(output, spec, state.split, path, lengths(state))

        return hook

    def _gather_output(self, path: str, split: Split):
        def hook(module: nn.Module, args: tuple, output):
            return self._require_state(path).gather(as_tensor(output, path), split, path)

        return hook

    def _attention_hooks(self, path: str, order: tuple[str, ...]):
        """The sequence-parallel kernel for one attention module, and hooks that count and check its calls."""
        calls = [0]
        custom = None if self.attention is None else self.attention(path, order, self._require_state)

        def kernel(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            scale=None,
            enable_gqa=False,
            backend=None,
        ):
            # backend: the diffusers attention backend the user set (None: the model called F.sdpa itself)
            if custom is not None:
                calls[0] += 1
                return custom(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            state = self._require_state(path)
            problems = unsupported_sdpa_arguments(dropout_p, is_causal, enable_gqa)
            if problems:
                raise NotImplementedError(
                    f"{path}: sequence-parallel attention does not support {', '.join(problems)}."
                )
            expected = state.local_length(order)
            if query.shape[-2] != expected or key.shape[-2] != expected:
                raise RuntimeError(
                    f"{path}: the plan says this attention runs over {order} with {expected} local tokens, but it got"
                    f" query {tuple(query.shape)} and key {tuple(key.shape)} (B, H, S, D). Check the plan."
                )
            check_backend(backend, query, key, value, path)  # refusals: on every rank alike, before any collective
            key_valid = shard_key_masks(state, order, attn_mask, query.device, path)
            calls[0] += 1
            return sequence_parallel_attention(
                query,
                key,
                value,
                self.groups,
                key_valid,
                scale,
                path,
                backend=backend,
                lse_fallback=self.lse_fallback,
                overlap=self.ulysses_overlap,
            )

        def reset_hook(module: nn.Module, args: tuple) -> None:
            calls[0] = 0

        def check_hook(module: nn.Module, args: tuple, output):
            if calls[0] == 0:
                raise RuntimeError(
                    f"{path} is declared as self-attention over the sharded sequence, but it reached neither"
                    " diffusers' attention dispatcher (dispatch_attention_fn with the processor's _attention_backend"
                    " and _parallel_config) nor F.scaled_dot_product_attention, so it attended to local tokens only."
                    " Use an attention processor that does, or fix the plan."
                )
            return output

        return kernel, reset_hook, check_hook

    def _require_state(self, path: str) -> ShardingState:
        if self.state is None:
            raise RuntimeError(f"{path} ran outside a forward of the parallelized {type(self.model).__name__}.")
        return self.state


def _ignoring_backend(kernel: Callable) -> Callable:
    """A kernel with SDPA's signature that runs torch's SDPA whatever backend the model set (``backend`` dropped)."""

    def routed(*args, backend=None, **kwargs):
        return kernel(*args, **kwargs)

    return routed


def lengths(state: ShardingState) -> LengthFn:
    """Whole lengths of the sequences cut so far in this forward (what a ``Concat`` split needs)."""
    return state.whole_length


def split_target(plan: DiTPlan, modules: Mapping[str, nn.Module], path: str) -> str:
    """The module that makes the cut of ``split_module_inputs[path]`` on this rank: the module itself or, for a
    block of a plan block list, the first block of the list from that index on that runs here. With a pipeline,
    that is the stage's first block of the list, which gets the loop's inputs exactly as the planned block would
    (blocks other stages own are stand-ins whose ``runs_on_this_rank`` is False).

    Raises:
        ValueError: when no block of the list from that index on runs on this rank.
    """
    position = plan.block_position(path)
    if position is None:
        return path
    list_path, index = position
    for i in range(index, len(modules[list_path])):
        if getattr(modules[f"{list_path}.{i}"], "runs_on_this_rank", True):
            return f"{list_path}.{i}"
    raise ValueError(
        f"Plan split_module_inputs[{path!r}]: no block of {list_path!r} from index {index} on runs on this rank."
    )


def apply_sequence_parallel(
    model: nn.Module,
    plan: DiTPlan,
    groups: SequenceGroups,
    *,
    attention: AttentionFactory | None = None,
    per_forward: bool = True,
    lse_fallback: LSEFallback = "warn",
    ulysses_overlap: UlyssesOverlap = "auto",
) -> SequenceParallel:
    """Install the plan's split, gather and attention hooks on ``model``.

    Checks the plan against the model (every path and attention pattern matches, heads split over the
    Ulysses degree) before anything is installed; every rank runs the same checks, so a bad plan fails on all
    of them.

    Args:
        model: the DiT.
        plan: its plan.
        groups: the sequence-parallel groups (both ``None``: one rank, the cuts still run).
        attention: the kernel of each self-attention module (default: Ulysses, Ring or USP over ``groups``).
        per_forward: start a ``ShardingState`` and cut ``split_inputs`` in a pre-hook of every forward of the DiT;
            ``False`` leaves that to the caller (``SequenceParallel.begin`` / ``end``).
        lse_fallback: Ring/USP with an attention backend that gives no log-sum-exp: ``"warn"`` once and run the ring
            blocks on torch's kernel, or ``"error"`` (see ``sequence/backends.py``).
        ulysses_overlap: Ulysses alone: process the heads in groups, each group's all-to-all overlapping another's
            attention (``False``/1: off, ``True``: 2 groups, an int: that many, ``"auto"``: what was measured faster on
            the device type; see ``sequence/ulysses.py``). Exact either way.

    Raises:
        ValueError: for a path or pattern that matches nothing, a module listed as both self- and
            cross-attention, or heads that do not split.
    """
    if lse_fallback not in ("warn", "error"):
        raise ValueError(f"lse_fallback must be 'warn' or 'error', got {lse_fallback!r}.")
    check_overlap_option(ulysses_overlap)
    sp = SequenceParallel(
        model,
        plan,
        groups,
        inspect.signature(model.forward),
        attention=attention,
        lse_fallback=lse_fallback,
        ulysses_overlap=ulysses_overlap,
    )
    missing_inputs = [n for n in plan.split_inputs if n not in sp.signature.parameters]
    if missing_inputs:
        raise ValueError(f"Plan split_inputs {missing_inputs} are not arguments of {type(model).__name__}.forward.")
    modules = dict(model.named_modules())
    outputs = {p: module_paths(modules, p) for p in (*plan.split_outputs, *plan.gather_outputs)}  # p -> module paths
    missing = [p for p in plan.split_module_inputs if p not in modules] + [
        p for p, found in outputs.items() if not found
    ]
    if missing:
        raise ValueError(f"Plan module paths {missing} do not exist in {type(model).__name__}.")
    targets = {path: split_target(plan, modules, path) for path in plan.split_module_inputs}
    for path, specs in plan.split_module_inputs.items():
        unknown = [n for n in specs if n not in inspect.signature(modules[targets[path]].forward).parameters]
        if unknown:
            raise ValueError(
                f"Plan split_module_inputs[{path!r}] {unknown} are not arguments of"
                f" {type(modules[targets[path]]).__name__}.forward"
                + ("." if targets[path] == path else f" (at {targets[path]!r}).")
            )
    attention = list(plan.self_attention_modules(model))
    tails = list(plan.replicated_tail_modules(model))
    if plan.replicated_tail_attention and not tails:
        raise ValueError(
            f"Plan replicated_tail_attention patterns {list(plan.replicated_tail_attention)} match no module of"
            f" {type(model).__name__}."
        )
    if plan.self_attention and not attention:
        raise ValueError(
            f"Plan self_attention patterns {list(plan.self_attention)} match no module of {type(model).__name__}."
        )
    cross = {path for path, _ in plan.cross_attention_modules(model)}
    unmatched = [p for p in plan.cross_attention if not any(fnmatch.fnmatchcase(path, p) for path in cross)]
    if unmatched and not holds_released_blocks(modules):  # a pipeline stage may hold none of a pattern's blocks
        raise ValueError(f"Plan cross_attention patterns {unmatched} match no module of {type(model).__name__}.")
    both = sorted(cross & {path for path, _, _ in (*attention, *tails)})
    if both:
        raise ValueError(f"Plan lists {both} of {type(model).__name__} as both self-attention and cross-attention.")
    both = sorted({path for path, _, _ in attention} & {path for path, _, _ in tails})
    if both:
        raise ValueError(f"Plan lists {both} of {type(model).__name__} as both self- and replicated-tail attention.")
    linear = list(plan.linear_attention_modules(model))
    if plan.linear_attention and not linear:
        raise ValueError(
            f"Plan linear_attention patterns {list(plan.linear_attention)} match no module of {type(model).__name__}."
        )
    also_linear = sorted({path for path, _, _ in linear} & (cross | {path for path, _, _ in (*attention, *tails)}))
    if also_linear:
        raise ValueError(f"Plan lists {also_linear} of {type(model).__name__} as linear attention and as another kind.")
    grids = [(path, grid) for path, _, grid in plan.token_grid_modules(model)]
    if plan.token_grids and not grids:
        raise ValueError(
            f"Plan token_grids patterns {list(plan.token_grids)} match no module of {type(model).__name__}."
        )
    check_callers(modules, grids)
    input_hooks = module_input_hooks(plan, model)
    for path, module, _ in (*attention, *tails):
        heads = getattr(module, "heads", getattr(module, "num_heads", None))  # diffusers / timm-style names
        if isinstance(heads, int):
            check_heads(heads, groups.ulysses_size, groups.size, path)
            if groups.ring_size == 1 and sp.attention is None:  # a number of head groups that cannot be: refused here
                overlap_head_groups(ulysses_overlap, heads // groups.ulysses_size, "cpu", path)  # (device: auto only)
    head_parallel = head_parallel_modules(plan, model)  # Ulysses at the projections (head_parallel.py)
    if plan.head_parallel_attention and not head_parallel and not holds_released_blocks(modules):
        raise ValueError(
            f"Plan head_parallel_attention patterns {list(plan.head_parallel_attention)} match no module of"
            f" {type(model).__name__}."
        )
    check_head_parallel(plan, head_parallel, groups, sp.attention is not None, type(model).__name__)

    if per_forward:
        sp.handles.append(model.register_forward_pre_hook(sp._begin_forward, with_kwargs=True))
        sp.handles.append(model.register_forward_hook(sp._end_forward, always_call=True))
    for path, specs in plan.split_module_inputs.items():
        target = modules[targets[path]]
        hook = sp._split_module_inputs(path, inspect.signature(target.forward), specs)
        # first of the module's pre-hooks: a pipeline stage then receives into tensors of the cut shape
        sp.handles.append(target.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
    for key, spec in plan.split_outputs.items():
        for path in outputs[key]:
            sp.handles.append(modules[path].register_forward_hook(sp._split_output(path, spec)))
    for key, split in plan.gather_outputs.items():
        for path in outputs[key]:
            sp.handles.append(modules[path].register_forward_hook(sp._gather_output(path, split)))
    for path, module, order in attention:
        kernel, reset_hook, check_hook = sp._attention_hooks(path, order)
        sp.handles.append(module.register_forward_pre_hook(reset_hook))
        sp.handles.extend(route_attention_during_forward(module, kernel, path))
        sp.handles.append(module.register_forward_hook(check_hook))
    for path, module, order in tails:
        kernel, reset_hook, check_hook = replicated_tail_hooks(path, order, sp._require_state)
        sp.handles.append(module.register_forward_pre_hook(reset_hook))
        sp.handles.extend(route_attention_during_forward(module, _ignoring_backend(kernel), path))
        sp.handles.append(module.register_forward_hook(check_hook))
    sp.handles.extend(install_module_input_hooks(input_hooks, sp._require_state))
    sp.handles.extend(install_head_parallel(head_parallel, groups, sp._require_state))
    for path, module, order in linear:
        sp.handles.extend(install_linear_attention(module, path, order, groups, sp._require_state))
    if grids:
        grid_hooks = TokenGridHooks(groups, sp._require_state)
        grid_hooks.install(modules, grids)
        sp.handles.extend(grid_hooks.handles)
    return sp
