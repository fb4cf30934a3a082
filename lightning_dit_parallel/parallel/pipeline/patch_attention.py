"""PipeFusion's self-attention: this pass's queries over the keys and values of the whole sequence, fresh for the
tokens computed so far in this step and stale (from the previous step) for the others.

Each self-attention module of a stage keeps a ``KVCache``: the keys and values of every token of the sequences it
attends over, laid out ``[sequence 1 | sequence 2 | ...]`` in the plan's order, with which rows were ever filled
and, where the model passes a key-padding ``attn_mask``, the key bias of every row. A call writes the rows of its
pass's parts (the patch of the image, and the whole text when it travels with every patch) and attends over all
rows; rows never filled yet (no warm-up) are masked out.

With sequence parallelism inside the stage, the kernel is Ulysses and Ring over the pass: queries, keys and values
of the rank's shard go through Ulysses' all-to-all (heads for sequence), then the fresh keys and values of the pass
are all-gathered over the ring axis, so every rank holds the cache of the whole sequence for its heads and attends
locally. (Passing the cache around the ring instead would send every cached token with every patch, ``M`` times
the bytes; gathering sends each fresh token once.) The inverse all-to-all restores the shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dit_parallel.parallel.pipeline.patches import PatchedSharding
from lightning_dit_parallel.parallel.sequence.attention import local_sdpa, unsupported_sdpa_arguments
from lightning_dit_parallel.parallel.sequence.comm import all_gather_dim, group_rank
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.mask_message import pack_local_mask, unpack_masks
from lightning_dit_parallel.parallel.sequence.masks import gather_key_mask
from lightning_dit_parallel.parallel.sequence.ulysses import HeadsToSequence, QKVToHeads

#: require_state(where) -> the state of the pass in progress (raises outside one).
StateFn = Callable[[str], PatchedSharding]


@dataclass
class KVCache:
    """Keys (B, H, K, D) and values (B, H, K, Dv) of every token of an attention's sequences, which of the K rows
    were filled, and the key bias (Bm, K) of the model's mask (``None`` while the model passed none)."""

    key: Tensor
    value: Tensor
    filled: Tensor  # (K,) bool
    offsets: dict[str, int]  # row where each sequence starts
    bias: Tensor | None = None

    @classmethod
    def empty(cls, key: Tensor, value: Tensor, lengths: dict[str, int]) -> KVCache:
        offsets, rows = {}, 0
        for name, length in lengths.items():
            offsets[name] = rows
            rows += length
        return cls(
            key.new_zeros((*key.shape[:-2], rows, key.shape[-1])),  # (B, H, K, D)
            value.new_zeros((*value.shape[:-2], rows, value.shape[-1])),  # (B, H, K, Dv)
            torch.zeros(rows, dtype=torch.bool, device=key.device),
            offsets,
        )

    def matches(self, key: Tensor, value: Tensor, lengths: dict[str, int]) -> bool:
        rows = sum(lengths.values())
        return (
            self.key.shape == (*key.shape[:-2], rows, key.shape[-1])
            and self.value.shape == (*value.shape[:-2], rows, value.shape[-1])
            and self.key.dtype == key.dtype
            and list(self.offsets) == list(lengths)
        )

    def write_bias(self, rows: slice, bias: Tensor | None) -> None:
        """Store the key bias (Bm, n) of ``rows`` (``None``: every key of them is valid)."""
        if bias is None and self.bias is None:
            return
        if self.bias is None:
            self.bias = torch.zeros((bias.shape[0], self.key.shape[-2]), dtype=bias.dtype, device=bias.device)
        if bias is not None and bias.shape[0] != self.bias.shape[0]:  # (1, K) and (B, K): keep one per sample
            self.bias = self.bias.expand(max(bias.shape[0], self.bias.shape[0]), -1).clone()
        self.bias[:, rows] = 0.0 if bias is None else bias.to(self.bias.dtype)  # (Bm, n) into (Bm, K)


class PatchAttention:
    """The caches of this stage's self-attention modules and the kernel factory for ``apply_sequence_parallel``.

    Args:
        groups: the sequence-parallel groups inside the stage (both ``None``: one rank).
    """

    def __init__(self, groups: SequenceGroups) -> None:
        self.groups = groups
        self.caches: dict[str, KVCache] = {}

    def clear(self) -> None:
        """Forget every cached key and value (a new batch)."""
        self.caches.clear()

    def __call__(self, path: str, order: tuple[str, ...], require_state: StateFn) -> Callable:
        """The kernel of the self-attention module at ``path``, attending over the sequences ``order``."""

        def kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            problems = unsupported_sdpa_arguments(dropout_p, is_causal, enable_gqa)
            if problems:
                raise NotImplementedError(f"{path}: PipeFusion attention does not support {', '.join(problems)}.")
            state = require_state(path)
            if not isinstance(state, PatchedSharding):
                raise RuntimeError(f"{path}: PipeFusion attention ran outside a PipeFusion pass.")
            return self._attend(path, order, state, query, key, value, attn_mask, scale)

        return kernel

    def _attend(
        self,
        path: str,
        order: tuple[str, ...],
        state: PatchedSharding,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None,
        scale: float | None,
    ) -> Tensor:
        groups = self.groups
        locals_ = [state.local_length((name,)) for name in order]  # tokens per sequence in this rank's shard
        width = sum(locals_)
        if query.shape[-2] != width or key.shape[-2] != width:
            raise RuntimeError(
                f"{path}: PipeFusion expects this pass's {width} local tokens of {order} (the plan's order), got query"
                f" {tuple(query.shape)} and key {tuple(key.shape)} (B, H, S, D). Check the plan's split points."
            )
        n, u = groups.size, groups.ulysses_size
        bias = rows = None
        if attn_mask is not None:
            bias, shard_rows = _model_mask(attn_mask, width, groups, query.dtype, path)  # (Bm, N, L) each
            if shard_rows is not None:  # rank-1 bias u_q * v_k: u of the queries this rank attends for
                ring_block = group_rank(groups.ring)
                rows = shard_rows[:, ring_block * u : (ring_block + 1) * u].flatten(1)  # (Bm, U, L) -> (Bm, U*L)
        if u > 1:
            if not query.shape == key.shape == value.shape:
                raise NotImplementedError(
                    f"{path}: PipeFusion with Ulysses needs q, k, v of one shape; got {tuple(query.shape)},"
                    f" {tuple(key.shape)}, {tuple(value.shape)}."
                )
            # 3 x (B, H, L, D) -> 3 x (B, H/U, U*L, D): this rank's heads of every Ulysses shard of the pass
            query, key, value = QKVToHeads(query, key, value, groups.ulysses).wait()
        if groups.ring_size > 1:  # the fresh keys and values of every shard of this pass, in shard order
            if key.shape == value.shape:
                # (2, B, H/U, U*L, D) -> (2, B, H/U, N*L, D)
                kv = all_gather_dim(torch.stack([key, value]), 3, groups.ring)
                key, value = kv[0], kv[1]
            else:
                key = all_gather_dim(key, 2, groups.ring)  # (B, H/U, U*L, D) -> (B, H/U, N*L, D)
                value = all_gather_dim(value, 2, groups.ring)
        lengths = {name: state.whole_length(name) for name in order}
        cache = self.caches.get(path)
        if cache is None or not cache.matches(key, value, lengths):
            cache = self.caches[path] = KVCache.empty(key, value, lengths)
        start = 0  # offset of the sequence inside a shard's local tokens
        for name, local in zip(order, locals_):
            first, size = state.patch.part(name)
            rows_here = slice(cache.offsets[name] + first, cache.offsets[name] + first + size)
            cache.key[..., rows_here, :] = _part_rows(key, n, width, start, local, size)  # (B, H/U, S_i, D)
            cache.value[..., rows_here, :] = _part_rows(value, n, width, start, local, size)
            cache.filled[rows_here] = True
            part_bias = None if bias is None else bias[:, :, start : start + local].flatten(1)[:, :size]  # (Bm, S_i)
            cache.write_bias(rows_here, part_bias)
            start += local
        mask = _attention_mask(cache, rows, query.dtype)
        out = local_sdpa(query, cache.key, cache.value, attn_mask=mask, scale=scale)  # (B, H/U, U*L, D)
        if u > 1:
            out = HeadsToSequence(out, groups.ulysses).wait()  # (B, H/U, U*L, D) -> (B, H, L, D)
        return out


def _part_rows(x: Tensor, shards: int, width: int, start: int, local: int, size: int) -> Tensor:
    """One sequence's rows of the pass from every shard's local tokens, padding dropped.

    (B, H, N*L, D) -> (B, H, N, L, D) -> (B, H, N, local, D) -> (B, H, N*local, D) -> (B, H, S_i, D).
    """
    per_shard = x.unflatten(-2, (shards, width)).narrow(-2, start, local)
    return per_shard.flatten(-3, -2).narrow(-2, 0, size)


def _model_mask(
    attn_mask: Tensor, width: int, groups: SequenceGroups, dtype: torch.dtype, where: str
) -> tuple[Tensor, Tensor | None]:
    """The model's mask of this pass on every shard: the key bias (Bm, N, L) and, for a rank-1 float bias, the
    queries' 0/1 part (Bm, N, L); one small all-gather over the sequence-parallel group (see ``mask_message.py``)."""
    packed, read = pack_local_mask(attn_mask, width, where)  # (Bm, W)
    gathered = gather_key_mask(packed, groups)  # (Bm, W) -> (Bm, N, W)
    return unpack_masks(gathered, read, width, dtype, where, "PipeFusion attention")


def _attention_mask(cache: KVCache, rows: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The additive mask of the queries over the cache: the model's key bias (times the queries' 0/1 part of a
    rank-1 bias), with rows never filled masked out. (Bm, 1, 1 or Q, K), or ``None`` when nothing is masked."""
    bias = cache.bias  # (Bm, K) or None
    if rows is not None and bias is not None:
        bias = rows[:, :, None].to(dtype) * bias[:, None, :]  # u_q * v_k: (Bm, Q, K)
    if not bool(cache.filled.all()):
        base = torch.zeros(cache.filled.shape, dtype=dtype, device=cache.filled.device) if bias is None else bias
        bias = base.masked_fill(~cache.filled, float("-inf"))  # (K,) / (Bm, [Q,] K): unfilled rows masked
    if bias is None:
        return None
    if bias.dim() == 3:
        return bias[:, None]  # (Bm, Q, K) -> (Bm, 1, Q, K)
    return bias.view(-1, 1, 1, bias.shape[-1])  # (Bm, K) / (K,) -> (Bm, 1, 1, K)
