"""Sharded self-attention over the plan's cut sequences followed by a tail of tokens that every rank holds whole.

Some attention processors assemble the joint sequence themselves, from tokens the plan cuts and tokens whose number
is only known at the call. Mochi's processor attends one sample at a time over its video tokens followed by the text
tokens that this sample's mask keeps. Cutting the text would give every rank a different number of kept tokens;
instead the plan leaves the text whole (every rank holds all of it and keeps the same tokens), and this kernel cuts
the tail per call, attends over the cut sequences and the tail's shards together (Ulysses, Ring or USP, with the
padding of both masked), and all-gathers the tail's output rows, so the processor gets them whole as it expects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_dit_parallel.parallel.sequence.attention import sequence_parallel_attention, unsupported_sdpa_arguments
from lightning_dit_parallel.parallel.sequence.comm import all_gather_dim
from lightning_dit_parallel.parallel.sequence.sharding import ShardedSequence, ShardingState


def replicated_tail_attention(
    q: Tensor, k: Tensor, v: Tensor, state: ShardingState, order: tuple[str, ...], scale: float | None, where: str
) -> Tensor:
    """Attention of this rank's tokens of ``order`` and of the whole tail over ``[order..., tail]`` of all ranks.

    Args:
        q, k, v: (B, H, L + R, D): this rank's ``L = state.local_length(order)`` tokens of the cut sequences, then
            the ``R`` tail tokens, the same on every rank.
        state: the sequences cut in this forward.
        order: the cut sequences, in the order the call holds them (before the tail).
        scale: softmax scale.
        where: the attention module's path, for error messages.

    Returns:
        (B, H, L + R, D): this rank's rows of the cut sequences and all R tail rows of attention over the whole
        sequence (every cut sequence, then the tail).
    """
    groups = state.groups
    local = state.local_length(order)
    tail = ShardedSequence(q.shape[-2] - local, groups.size)
    if tail.length < 0 or not q.shape == k.shape == v.shape:
        raise RuntimeError(
            f"{where}: the plan says this attention runs over {order} ({local} local tokens) and then a tail every"
            f" rank holds whole, but it got query {tuple(q.shape)}, key {tuple(k.shape)} and value {tuple(v.shape)}"
            " (B, H, S, D). Check the plan."
        )
    sequences = [state.sequences[name] for name in order] + [tail]

    def cut_tail(x: Tensor) -> Tensor:
        head, rest = x.split([local, tail.length], dim=-2)  # (B, H, L + R, D) -> (B, H, L, D), (B, H, R, D)
        pad = x.new_zeros(*x.shape[:-2], tail.local * tail.shards - tail.length, x.shape[-1])
        rest = torch.cat([rest, pad], dim=-2)  # (B, H, R, D) -> (B, H, N*r, D), r = ceil(R/N)
        shard = rest.narrow(-2, groups.rank * tail.local, tail.local)  # (B, H, N*r, D) -> (B, H, r, D)
        return torch.cat([head, shard], dim=-2)  # -> (B, H, L + r, D)

    def key_valid(shards: list[int], query_shards: list[int] | None = None) -> Tensor | None:  # key padding only
        if not any(seq.padded for seq in sequences):
            return None
        parts = [torch.arange(s.local, device=q.device) < s.valid_in(shard) for shard in shards for s in sequences]
        return torch.cat(parts).view(1, -1)  # n shards x [order..., tail] -> (1, n * (L + r))

    out = sequence_parallel_attention(cut_tail(q), cut_tail(k), cut_tail(v), groups, key_valid, scale, where)
    head, tail_out = out.split([local, tail.local], dim=-2)  # (B, H, L + r, D) -> (B, H, L, D), (B, H, r, D)
    # Ulysses ranks are the inner axis: gather them first, then the ring, so the shards end up in rank order.
    tail_out = all_gather_dim(tail_out, 2, groups.ulysses)  # (B, H, r, D) -> (B, H, U*r, D)
    tail_out = all_gather_dim(tail_out, 2, groups.ring)  # (B, H, U*r, D) -> (B, H, N*r, D)
    return torch.cat([head, tail_out.narrow(2, 0, tail.length)], dim=2)  # -> (B, H, L + R, D): padding dropped


def replicated_tail_hooks(path: str, order: tuple[str, ...], require_state: Callable[[str], ShardingState]):
    """The replicated-tail kernel for one attention module, and hooks that count and check its calls.

    Returns:
        ``(kernel, reset_hook, check_hook)``: ``kernel`` stands in for ``F.scaled_dot_product_attention`` during the
        module's forward; the forward pre-hook ``reset_hook`` and forward hook ``check_hook`` make sure it ran.
    """
    calls = [0]

    def kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        problems = unsupported_sdpa_arguments(dropout_p, is_causal, enable_gqa)
        if attn_mask is not None:
            problems.append("attn_mask (the tail is the tokens the processor kept)")
        if problems:
            raise NotImplementedError(f"{path}: replicated-tail attention does not support {', '.join(problems)}.")
        calls[0] += 1
        return replicated_tail_attention(query, key, value, require_state(path), order, scale, path)

    def reset_hook(module: nn.Module, args: tuple) -> None:
        calls[0] = 0

    def check_hook(module: nn.Module, args: tuple, output):
        if calls[0] == 0:
            raise RuntimeError(
                f"{path} is declared as replicated-tail attention over the sharded sequence, but it never called"
                " F.scaled_dot_product_attention, so it attended to local tokens only. Fix the plan."
            )
        return output

    return kernel, reset_hook, check_hook
