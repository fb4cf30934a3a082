"""Key masks of sharded self-attention: a model's own padding mask (e.g. of its text tokens) and the padding that
sharding adds, over the keys of any set of sequence-parallel shards.

A DiT whose joint attention takes a text mask computes that mask from its (cut) inputs, so inside a sharded
forward the ``attn_mask`` passed to ``F.scaled_dot_product_attention`` covers this rank's local queries and keys
only. Ulysses and Ring attend to the keys of other ranks too, so the mask's key part is all-gathered over the
sequence-parallel group (one small collective per attention call) and read per shard.

Only masks that do not depend on the query are exact this way: a key mask (``(B, 1, 1, S)``-like) or, for boolean
masks, the outer product of a token mask with itself (``(B, 1, S, S)`` with fully masked rows for padded
queries); their key part is what every real query sees. Causal, block or per-head masks are rejected.

Masks returned here are ``(Bm, K)`` with ``Bm`` 1 or the batch size: boolean (``True`` = attend) or, for a model
that passes an additive float mask, float (``-inf`` = masked).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dit_parallel.sequence.comm import all_gather_dim
from lightning_dit_parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.sequence.sharding import ShardingState


def local_key_mask(attn_mask: Tensor, local_keys: int, where: str) -> Tensor:
    """The key part of a mask over this rank's local queries and keys.

    Args:
        attn_mask: broadcastable to (B, H, Sq, Sk) with Sk = ``local_keys``; bool (True = attend) or additive float.
        local_keys: keys on this rank (padding included).
        where: the attention module's path, for error messages.

    Returns:
        (Bm, Sk): one key mask per batch element (Bm = 1 when the mask does not depend on the batch).

    Raises:
        NotImplementedError: for a mask that depends on the head or on the query (other than fully masked rows
            of a boolean mask), which sharded attention cannot honour exactly.
    """
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)  # (Sk,) / (Sq, Sk) / (B, Sq, Sk) -> (B, H, Sq, Sk) with size-1 dims
    if mask.dim() != 4 or mask.shape[-1] != local_keys:
        raise NotImplementedError(
            f"{where}: sequence-parallel attention got attn_mask of shape {tuple(attn_mask.shape)}; it supports masks"
            f" broadcastable to (B, H, S, S) over the {local_keys} local keys."
        )
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            raise NotImplementedError(f"{where}: sequence-parallel attention does not support a per-head attn_mask.")
        mask = mask[:, :1]  # (B, H, Sq, Sk) -> (B, 1, Sq, Sk): every head has the same mask
    if mask.dtype == torch.bool:
        keys = mask.any(dim=2, keepdim=True)  # (B, 1, Sq, Sk) -> (B, 1, 1, Sk): keys some query attends to
        rows = mask.any(dim=3, keepdim=True)  # (B, 1, Sq, 1): queries that attend to something
        query_independent = bool(((mask == keys) | ~rows).all())
    else:
        keys = mask[:, :, :1]  # (B, 1, Sq, Sk) -> (B, 1, 1, Sk)
        query_independent = bool((mask == keys).all())
    if not query_independent:
        raise NotImplementedError(
            f"{where}: sequence-parallel attention supports key-padding masks only; this attn_mask depends on the query"
            " (e.g. causal or block-sparse), which a sharded sequence cannot reproduce exactly."
        )
    return keys.flatten(1)  # (B, 1, 1, Sk) -> (B, Sk)


def gather_key_mask(mask: Tensor, groups: SequenceGroups) -> Tensor:
    """Every sequence-parallel rank's local key mask, by shard: (Bm, Sk) -> (Bm, N, Sk), shard ``i`` in row ``i``.

    Ulysses ranks are the inner axis, so gathering over them first and then over the ring puts the shards in
    sequence-parallel rank order (``ring_rank * ulysses + ulysses_rank``). Every rank of a group calls this for the
    same attention module in the same order, so the collective is never skipped on one rank only.
    """
    x = mask.unsqueeze(1)  # (Bm, Sk) -> (Bm, 1, Sk)
    x = all_gather_dim(x, 1, groups.ulysses)  # -> (Bm, U, Sk)
    return all_gather_dim(x, 1, groups.ring)  # -> (Bm, N, Sk)


def combine_key_masks(padding: Tensor | None, model_mask: Tensor | None) -> Tensor | None:
    """One (Bm, K) mask from the sharding padding (K,) bool and a model's (Bm, K) mask; ``None`` when both are."""
    if model_mask is None:
        return None if padding is None else padding.view(1, -1)  # (K,) -> (1, K)
    if padding is None:
        return model_mask
    if model_mask.dtype == torch.bool:
        return model_mask & padding  # (Bm, K) & (K,) -> (Bm, K)
    return model_mask.masked_fill(~padding, float("-inf"))  # additive: padded keys -> -inf


def mask_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (Bm, K) bool or additive mask as an additive (Bm, 1, 1, K) bias of ``dtype``."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(dtype)
    return bias.view(mask.shape[0], 1, 1, -1)  # (Bm, K) -> (Bm, 1, 1, K)


def has_keys(mask: Tensor | None) -> bool:
    """Whether a (Bm, K) mask lets any key through (``None``: all keys are valid)."""
    if mask is None:
        return True
    return bool(mask.any()) if mask.dtype == torch.bool else bool((mask > float("-inf")).any())


def shard_key_masks(
    state: ShardingState, order: tuple[str, ...], attn_mask: Tensor | None, device: torch.device, where: str
) -> Callable[[list[int]], Tensor | None]:
    """``key_valid(shards)`` for one sharded attention call over the sequences ``order``: the (Bm, n * L) mask of
    the keys of the given shards, from the sharding padding and the model's own ``attn_mask`` (gathered here, once
    per call, from every shard), or ``None`` when every key is valid."""
    model_mask = None
    if attn_mask is not None:
        local = local_key_mask(attn_mask, state.local_length(order), where)  # (Bm, L)
        model_mask = gather_key_mask(local, state.groups)  # (Bm, N, L)

    def key_valid(shards: list[int]) -> Tensor | None:
        shard_masks = None if model_mask is None else model_mask[:, shards].flatten(1)  # (Bm, n, L) -> (Bm, n * L)
        return combine_key_masks(state.key_valid(order, shards, device), shard_masks)

    return key_valid
