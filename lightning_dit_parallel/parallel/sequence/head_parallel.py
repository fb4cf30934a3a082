"""Ulysses at an attention module's projections, for processors that need the whole sequence (``HeadProjections``).

Some attention processors slice queries and keys by global token positions or build masks over them (Qwen-Image
2.1's block-causal prefill makes one attention call per prefix segment, ``query[:, start:end]`` against
``key[:, :end]``). Swapping ``F.scaled_dot_product_attention`` cannot make those exact: the slices are taken before
the kernel runs. But after Ulysses' all-to-all every rank holds every token of its heads, where any slice, mask or
KV cache is what one process computes. So the all-to-all is made at the module's projections:

* forward hooks on the query, key and value projections: (B, S/U, H*D) all heads of this rank's tokens ->
  (B, S, H/U*D) this rank's heads of every token (padding of the cut dropped);
* the processor runs unchanged, on the whole sequence (with the whole rotary table and masks the DiT passes);
* a forward pre-hook on the output projection: (B, S, H/U*D) -> (B, S/U, H*D).

The traffic is Ulysses' (4/U of the q, k, v and output activations per layer). A ring rank never holds the whole
sequence, so ``ring_degree > 1`` is refused at setup, as are other attention kernels (PipeFusion, DistriFusion).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.sequence.comm import PendingAllToAll
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.parallel.sequence.ulysses import check_heads
from lightning_dit_parallel.plan import DiTPlan, HeadProjections

#: require_state(where) -> the sharding state of the forward in progress (raises outside one).
StateFn = Callable[[str], ShardingState]


def head_parallel_modules(plan: DiTPlan, model: nn.Module) -> list[tuple[str, nn.Module, HeadProjections]]:
    """The modules matched by ``plan.head_parallel_attention`` with their projections checked to exist.

    Raises:
        ValueError: for a projection path the module does not have.
    """
    found = []
    for path, module in model.named_modules():
        for pattern, heads in plan.head_parallel_attention.items():
            if fnmatch.fnmatchcase(path, pattern):
                for name in (*heads.inputs, heads.output):
                    try:
                        module.get_submodule(name)
                    except AttributeError:
                        raise ValueError(
                            f"Plan head_parallel_attention[{pattern!r}]: {type(module).__name__} at {path!r} has no"
                            f" projection {name!r}."
                        ) from None
                found.append((path, module, heads))
                break
    return found


def check_head_parallel(
    plan: DiTPlan,
    modules: list[tuple[str, nn.Module, HeadProjections]],
    groups: SequenceGroups,
    custom_kernel: bool,
    name: str,
) -> None:
    """Pure checks, the same verdict on every rank: ring degree 1, no other attention kernel, heads that split.

    Raises:
        ValueError: naming the reason.
    """
    if not plan.head_parallel_attention:
        return
    patterns = list(plan.head_parallel_attention)
    if groups.ring_size > 1:
        raise ValueError(
            f"{name}: the attention of {patterns} needs the whole sequence (its processor slices or masks by global"
            f" token positions), which only Ulysses gives each rank; ring_degree={groups.ring_size} cannot run it"
            f" exactly. Use ulysses_degree={groups.size}, ring_degree=1."
        )
    if custom_kernel:
        raise ValueError(
            f"{name}: the attention of {patterns} runs on the whole sequence after a Ulysses all-to-all at its"
            " projections; patch pipelines (PipeFusion, DistriFusion) cannot run it. Use Ulysses."
        )
    for path, module, _ in modules:
        heads = getattr(module, "heads", getattr(module, "num_heads", None))
        if isinstance(heads, int):
            check_heads(heads, groups.ulysses_size, groups.size, path)


def install_head_parallel(
    modules: list[tuple[str, nn.Module, HeadProjections]], groups: SequenceGroups, require_state: StateFn
) -> list[RemovableHandle]:
    """Hooks on the projections of every module (see the module docstring)."""
    handles = []
    for path, module, heads in modules:
        for name in heads.inputs:
            hook = _to_heads_hook(f"{path}.{name}", heads.sequence, groups, require_state)
            handles.append(module.get_submodule(name).register_forward_hook(hook))
        hook = _to_tokens_hook(f"{path}.{heads.output}", heads.sequence, groups, require_state)
        # prepend: ahead of tensor parallelism's row-wise input hook (applied earlier), which makes the input a DTensor
        handles.append(module.get_submodule(heads.output).register_forward_pre_hook(hook, prepend=True))
    return handles


def _to_heads_hook(where: str, sequence: str, groups: SequenceGroups, require_state: StateFn):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        seq = require_state(where).sequences.get(sequence)
        if seq is None or output.shape[1] != seq.local:
            raise RuntimeError(
                f"{where}: expected ({seq.local if seq else '?'}) local tokens of {sequence!r} in dim 1, got"
                f" {tuple(output.shape)}; check the plan's head_parallel_attention."
            )
        return to_heads(output, groups)[:, : seq.length]  # (B, U*L, F/U) -> (B, S, F/U): padding dropped

    return hook


def _to_tokens_hook(where: str, sequence: str, groups: SequenceGroups, require_state: StateFn):
    def hook(module: nn.Module, args: tuple) -> tuple:
        seq = require_state(where).sequences[sequence]
        if not args:
            raise RuntimeError(f"{where}: the output projection is expected to take the attention output positionally.")
        x = args[0]
        if x.shape[1] != seq.length:
            raise RuntimeError(
                f"{where}: expected all {seq.length} tokens of {sequence!r} in dim 1, got {tuple(x.shape)}."
            )
        pad = seq.local * seq.shards - seq.length
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)  # (B, S, F/U) -> (B, U*L, F/U)
        return (to_tokens(x, groups), *args[1:])

    return hook


def to_heads(x: Tensor, groups: SequenceGroups) -> Tensor:
    """(B, L, F) all features (heads) of this rank's L tokens -> (B, U*L, F/U): head chunk ``rank`` of every shard's
    tokens, shards in rank order."""
    u = groups.ulysses_size
    if u == 1:
        return x
    b, length, features = x.shape
    if features % u:
        raise RuntimeError(f"{features} projection features do not split over ulysses_degree={u}.")
    x = x.reshape(b, length, u, features // u).permute(2, 0, 1, 3)  # (B, L, F) -> (U, B, L, F/U): chunk i to rank i
    x = PendingAllToAll(x, groups.ulysses).wait()  # (U, B, L, F/U): row j is rank j's tokens of this rank's chunk
    return x.permute(1, 0, 2, 3).reshape(b, u * length, features // u)  # -> (B, U*L, F/U)


def to_tokens(x: Tensor, groups: SequenceGroups) -> Tensor:
    """The inverse of ``to_heads``: (B, U*L, F/U) this rank's heads of every token -> (B, L, F) all heads of this
    rank's tokens, head chunks in rank order."""
    u = groups.ulysses_size
    if u == 1:
        return x
    b, tokens, part = x.shape
    x = x.reshape(b, u, tokens // u, part).permute(1, 0, 2, 3)  # (B, U*L, F/U) -> (U, B, L, F/U): shard j to rank j
    x = PendingAllToAll(x, groups.ulysses).wait()  # (U, B, L, F/U): row i is rank i's head chunk of these tokens
    return x.permute(1, 2, 0, 3).reshape(b, tokens // u, u * part)  # -> (B, L, F)


__all__ = ["check_head_parallel", "head_parallel_modules", "install_head_parallel", "to_heads", "to_tokens"]
