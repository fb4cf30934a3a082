"""Modules that mix neighbouring tokens of a sharded sequence laid out as a grid (convolutions), run exactly.

A sequence of ``S = n_0 * n_1 * ... `` tokens in row-major grid order is cut over ranks in contiguous shards
(``sharding.py``). A convolution needs each token's grid neighbours, which other ranks may hold. The plan's
``TokenGrid`` names the module and its caller (the parent module, which reshapes tokens to the grid with size
arguments). Hooks:

* the caller receives ``(1, ..., 1, local)`` for its size arguments, so its reshape gives this rank's tokens as a
  strip and the module receives them as such;
* the module's pre-hook replaces that strip with a window of whole outermost slices: the slices holding this rank's
  real tokens plus ``halo`` slices on each side (clipped at the grid's border), fetched point-to-point from the
  ranks that hold them. Outputs more than ``halo`` slices inside the window are those of the whole grid;
* the module's forward hook keeps the outputs of this rank's tokens, padded again to the strip.

Traffic per call: at most ``2 * (halo + 1)`` slices of the module's input per rank (the window's rounding to whole
slices adds up to one slice on each side), independent of the number of ranks; compute: the same extra slices.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.sequence.comm import all_gather_dim
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.sharding import ShardedSequence, ShardingState
from lightning_dit_parallel.plan import TokenGrid
from lightning_dit_parallel.plan.splits import as_tensor


def owned_range(seq: ShardedSequence, shard: int) -> tuple[int, int]:
    """The real tokens ``[start, stop)`` of the whole sequence that ``shard`` holds (empty when all are padding)."""
    start = min(shard * seq.local, seq.length)
    return start, min(start + seq.local, seq.length)


def grid_window(seq: ShardedSequence, shard: int, sizes: Sequence[int], halo: int) -> tuple[int, int]:
    """Tokens ``[lo, hi)`` of the whole outermost slices ``shard`` runs the module on.

    The slices holding the shard's real tokens, ``halo`` more on each side, clipped to the grid; a shard without real
    tokens runs on the last slice (its outputs are dropped) so that every rank runs the module on a non-empty grid.
    """
    slice_tokens = math.prod(sizes[1:])
    start, stop = owned_range(seq, shard)
    first, last = (start // slice_tokens, (stop - 1) // slice_tokens) if stop > start else (sizes[0] - 1,) * 2
    return max(0, first - halo) * slice_tokens, min(sizes[0], last + 1 + halo) * slice_tokens


def fetch_window(
    x: Tensor, dim: int, seq: ShardedSequence, windows: Sequence[tuple[int, int]], shard: int, ranks: Sequence[int]
) -> Tensor:
    """Tokens ``windows[shard]`` of the whole sequence, from this shard's ``x`` and point-to-point from the others.

    Every rank sends each other rank the part of its real tokens that the other's window holds; all ranks compute
    the same ``windows``, so every send has its receive. ``ranks``: global rank of every shard.

    (..., local, ...) -> (..., hi - lo, ...) along ``dim``.
    """
    start, _ = owned_range(seq, shard)

    def part(owner: int, reader: int) -> tuple[int, int]:  # tokens of ``owner`` in the window of ``reader``
        lo, hi = windows[reader]
        own_start, own_stop = owned_range(seq, owner)
        return max(lo, own_start), min(hi, own_stop)

    ops, received = [], {}
    for other in range(len(windows)):
        if other == shard:
            continue
        a, b = part(shard, other)
        if b > a:  # (..., local, ...) -> (..., b - a, ...): my tokens in the other's window
            ops.append(dist.P2POp(dist.isend, x.narrow(dim, a - start, b - a).contiguous(), ranks[other]))
        a, b = part(other, shard)
        if b > a:
            shape = list(x.shape)
            shape[dim] = b - a
            received[other] = x.new_empty(shape)  # (..., b - a, ...): the other's tokens in my window
            ops.append(dist.P2POp(dist.irecv, received[other], ranks[other]))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    pieces = []
    for owner in range(len(windows)):  # shards hold consecutive tokens: shard order is token order
        a, b = part(owner, shard)
        if b > a:
            pieces.append(x.narrow(dim, a - start, b - a) if owner == shard else received[owner])
    return torch.cat(pieces, dim=dim)  # pieces in token order -> (..., hi - lo, ...)


def with_layout_of(y: Tensor, x: Tensor) -> Tensor:
    """``y`` (as many dims as ``x``) stored in ``x``'s order of dims in memory, so that the module runs the kernels it
    runs without sequence parallelism (a convolution on a channels-last input picks another algorithm)."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))  # outermost in memory first
    inverse = [order.index(d) for d in range(x.dim())]
    return y.permute(order).contiguous().permute(inverse)  # same shape and values, x's memory order


def shard_ranks(groups: SequenceGroups, device: torch.device) -> list[int]:
    """Global rank of every sequence-parallel shard, in shard order (one small all-gather per group)."""
    me = torch.tensor([dist.get_rank() if dist.is_initialized() else 0], device=device)
    ranks = all_gather_dim(me, 0, groups.ulysses)  # (1,) -> (U,)
    return all_gather_dim(ranks, 0, groups.ring).tolist()  # (U,) -> (R*U,): shard = ring_rank * U + ulysses_rank


def check_callers(
    modules: dict[str, nn.Module], grids: Sequence[tuple[str, TokenGrid]]
) -> dict[str, tuple[TokenGrid, inspect.Signature]]:
    """The caller (parent module) of every grid module, with its grid and forward signature; installs nothing.

    Raises:
        ValueError: for a grid module at the root, a caller without the size arguments, or callers whose grid
            modules disagree on the sizes or the sequence.
    """
    callers: dict[str, tuple[TokenGrid, inspect.Signature]] = {}
    for path, grid in grids:
        caller = path.rpartition(".")[0]
        if "." not in path or caller not in modules:
            raise ValueError(f"token_grids names {path!r}, which has no parent module to lay out its grid.")
        if caller not in callers:
            signature = inspect.signature(modules[caller].forward)
            missing = [n for n in grid.sizes if n not in signature.parameters]
            if missing:
                raise ValueError(
                    f"token_grids: {missing} are not arguments of {type(modules[caller]).__name__}.forward"
                    f" ({caller!r})."
                )
            callers[caller] = (grid, signature)
        known = callers[caller][0]
        if (known.sequence, known.sizes) != (grid.sequence, grid.sizes):
            raise ValueError(f"token grids under {caller!r} disagree on their sequence or sizes: {known}, {grid}.")
    return callers


@dataclass
class TokenGridHooks:
    """The hooks of every token-grid module of a plan, and what they share within one forward."""

    groups: SequenceGroups
    require_state: Callable[[str], ShardingState]
    #: caller path -> the grid sizes it received in its forward in progress
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: module path -> the window ``(lo, hi)`` its forward in progress runs on
    windows: dict[str, tuple[int, int]] = field(default_factory=dict)
    ranks: list[int] | None = None
    handles: list[RemovableHandle] = field(default_factory=list)

    def install(self, modules: dict[str, nn.Module], grids: Sequence[tuple[str, TokenGrid]]) -> None:
        """Hooks on every grid module and on its caller (one per caller); ``check_callers`` first."""
        for caller, (grid, signature) in check_callers(modules, grids).items():
            self.handles.append(
                modules[caller].register_forward_pre_hook(self._caller_hook(caller, grid, signature), with_kwargs=True)
            )
        for path, grid in grids:
            module = modules[path]
            caller = path.rpartition(".")[0]
            signature = inspect.signature(module.forward)
            self.handles.append(
                module.register_forward_pre_hook(self._window_hook(path, caller, grid, signature), with_kwargs=True)
            )
            self.handles.append(module.register_forward_hook(self._keep_own_hook(path, caller, grid)))

    def _caller_hook(self, caller: str, grid: TokenGrid, signature: inspect.Signature):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            seq = self.require_state(caller).sequences.get(grid.sequence)
            if seq is None:
                raise RuntimeError(f"{caller}: sequence {grid.sequence!r} of its token grid was not cut before it ran.")
            bound = signature.bind(*args, **kwargs)
            sizes = tuple(bound.arguments.get(name) for name in grid.sizes)
            if not all(isinstance(n, int) for n in sizes) or math.prod(sizes) != seq.length:
                raise ValueError(
                    f"{caller}: grid sizes {dict(zip(grid.sizes, sizes))} must be ints whose product is the"
                    f" {seq.length} tokens of {grid.sequence!r}."
                )
            self.sizes[caller] = sizes
            strip = (1,) * (len(sizes) - 1) + (seq.local,)  # this rank's tokens as a 1 x ... x local strip
            for name, n in zip(grid.sizes, strip):
                bound.arguments[name] = n
            return bound.args, bound.kwargs

        return hook

    def _window_hook(self, path: str, caller: str, grid: TokenGrid, signature: inspect.Signature):
        first = next(iter(signature.parameters))

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            state = self.require_state(path)
            seq, sizes = state.sequences[grid.sequence], self.sizes[caller]
            bound = signature.bind(*args, **kwargs)
            x = as_tensor(bound.arguments[first], path)
            dim = grid.dim % x.dim()
            strip = (1,) * (len(sizes) - 1) + (seq.local,)
            if tuple(x.shape[dim : dim + len(sizes)]) != strip:
                raise RuntimeError(
                    f"{path}: expected this rank's tokens as a {strip} strip at dim {grid.dim}, got {tuple(x.shape)}."
                )
            if self.ranks is None:
                self.ranks = shard_ranks(self.groups, x.device)
            windows = [grid_window(seq, shard, sizes, grid.halo) for shard in range(seq.shards)]
            lo, hi = self.windows[path] = windows[self.groups.rank]
            tokens = x.flatten(dim, dim + len(sizes) - 1)  # (..., 1, ..., 1, local, ...) -> (..., local, ...)
            window = fetch_window(tokens, dim, seq, windows, self.groups.rank, self.ranks)  # -> (..., hi-lo, ...)
            slice_tokens = math.prod(sizes[1:])
            # (..., hi - lo, ...) -> (..., (hi - lo) / slice, n_1, ..., ...): whole outermost slices of the grid
            window = window.unflatten(dim, ((hi - lo) // slice_tokens, *sizes[1:]))
            bound.arguments[first] = with_layout_of(window, x)  # e.g. channels-last stays channels-last
            return bound.args, bound.kwargs

        return hook

    def _keep_own_hook(self, path: str, caller: str, grid: TokenGrid):
        def hook(module: nn.Module, args: tuple, output) -> Tensor:
            state = self.require_state(path)
            seq, sizes = state.sequences[grid.sequence], self.sizes[caller]
            lo, hi = self.windows.pop(path)
            out = as_tensor(output, path)
            dim = grid.dim % out.dim()
            window_shape = ((hi - lo) // math.prod(sizes[1:]), *sizes[1:])
            if tuple(out.shape[dim : dim + len(sizes)]) != window_shape:
                raise RuntimeError(
                    f"{path}: a token-grid module must keep the grid shape; it ran on {window_shape} at dim {grid.dim}"
                    f" and returned {tuple(out.shape)}."
                )
            tokens = out.flatten(dim, dim + len(sizes) - 1)  # (..., slices, n_1, ..., ...) -> (..., hi - lo, ...)
            start, stop = owned_range(seq, self.groups.rank)
            own = tokens.narrow(dim, start - lo, stop - start) if stop > start else tokens.narrow(dim, 0, 0)
            pad = list(own.shape)
            pad[dim] = seq.local - (stop - start)
            own = torch.cat([own, own.new_zeros(pad)], dim=dim)  # (..., real, ...) -> (..., local, ...)
            return own.unflatten(dim, (1,) * (len(sizes) - 1) + (seq.local,))  # -> (..., 1, ..., 1, local, ...)

        return hook
