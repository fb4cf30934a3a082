"""Key masks of sharded self-attention: a model's own padding mask (e.g. of its text tokens) and the padding that
sharding adds, over the keys of any set of sequence-parallel shards.

A DiT whose joint attention takes a text mask computes that mask from its (cut) inputs, so inside a sharded
forward the ``attn_mask`` passed to ``F.scaled_dot_product_attention`` covers this rank's local queries and keys
only. Ulysses and Ring attend to the keys of other ranks too, so the mask's key part is all-gathered over the
sequence-parallel group (one small collective per attention call) and read per shard.

Exact this way: a key mask (``(B, 1, 1, S)``-like); for boolean masks, the outer product of a token mask with
itself (``(B, 1, S, S)`` with fully masked rows for padded queries: their key part is what every real query sees);
and for additive float masks, a rank-1 product ``u_q * v_k`` with ``u`` in {0, 1} (rows either 0 or one key bias
``v``, as diffusers' Chroma and CogView4 build from a 0/1 token mask), whose query part is gathered too. Causal,
block or per-head masks are rejected.

Masks returned here are ``(Bm, K)`` (key masks) or ``(Bm, Q, K)`` (with a query part), ``Bm`` 1 or the batch size:
boolean (``True`` = attend) or additive float (``-inf`` = masked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dit_parallel.parallel.sequence.comm import all_gather_dim
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.sharding import ShardingState


@dataclass(frozen=True)
class LocalMask:
    """What one rank reads off its local ``attn_mask`` (see ``local_key_mask``).

    Args:
        keys: (Bm, Sk) key mask or key bias.
        problem: why the mask cannot be honoured as a key mask, or ``None``.
        rows: for a float mask over (Sq, Sk): (Bm, Sq) 0/1, the rows that carry the key bias; the mask may then
            be a rank-1 product ``u_q * v_k`` (diffusers' Chroma and CogView4 add a 0/1 token mask times itself).
        rank_one_problem: why it is not such a product either, or ``None``.
        has_neg_inf: whether the mask holds ``-inf`` (then it masks keys and is read as a key mask).
    """

    keys: Tensor
    problem: str | None
    rows: Tensor | None = None
    rank_one_problem: str | None = None
    has_neg_inf: bool = False


def local_key_mask(attn_mask: Tensor, local_keys: int, where: str) -> LocalMask:
    """The key part (and, for a full float mask, the query part) of a mask over this rank's local queries and keys.

    What is computed depends on shapes only, which every rank of the group shares, so every rank then makes the same
    collectives; a mask whose values cannot be honoured is reported, not raised, so that the ranks can agree on the
    error (and on how to read a float mask) after the gather.

    Args:
        attn_mask: broadcastable to (B, H, Sq, Sk) with Sk = ``local_keys``; bool (True = attend) or additive float.
        local_keys: keys on this rank (padding included).
        where: the attention module's path, for error messages.

    Raises:
        NotImplementedError: for a mask shape that sharded attention cannot take.
    """
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)  # (Sk,) / (Sq, Sk) / (B, Sq, Sk) -> (B, H, Sq, Sk) with size-1 dims
    if mask.dim() != 4 or mask.shape[-1] != local_keys:
        raise NotImplementedError(
            f"{where}: sequence-parallel attention got attn_mask of shape {tuple(attn_mask.shape)}; it supports masks"
            f" broadcastable to (B, H, S, S) over the {local_keys} local keys."
        )
    per_head = None
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            per_head = "a per-head attn_mask"
        mask = mask[:, :1]  # (B, H, Sq, Sk) -> (B, 1, Sq, Sk): every head has the same mask
    query_dependent = "a query-dependent attn_mask (e.g. causal or block-sparse)"
    if mask.dtype == torch.bool:
        keys = mask.any(dim=2, keepdim=True)  # (B, 1, Sq, Sk) -> (B, 1, 1, Sk): keys some query attends to
        attending = mask.any(dim=3, keepdim=True)  # (B, 1, Sq, 1): queries that attend to something
        independent = bool(((mask == keys) | ~attending).all())
        return LocalMask(keys.flatten(1), per_head or (None if independent else query_dependent))
    masked_rows = torch.isneginf(mask).all(dim=3, keepdim=True)  # (B, 1, Sq, 1): queries that attend to nothing
    biased = (mask != 0).any(dim=3, keepdim=True) & ~masked_rows  # (B, 1, Sq, 1): rows with a key bias
    first = biased.float().argmax(dim=2, keepdim=True)  # (B, 1, 1, 1): one of them (row 0 when none)
    keys = mask.gather(2, first.expand(-1, -1, -1, mask.shape[-1]))  # (B, 1, 1, Sk)
    independent = bool(((mask == keys) | masked_rows).all())
    local = LocalMask(keys.flatten(1), per_head or (None if independent else query_dependent))
    if mask.shape[2] == 1:
        return local
    rank_one = bool(((mask == keys) | ~biased).all()) and not bool(masked_rows.any())
    return LocalMask(
        local.keys,
        local.problem,
        rows=biased.float().flatten(1),  # (B, 1, Sq, 1) -> (B, Sq)
        rank_one_problem=per_head or (None if rank_one else query_dependent),
        has_neg_inf=bool(torch.isneginf(mask).any()),
    )


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
    """One (Bm, K) or (Bm, Q, K) mask from the sharding padding (K,) bool and a model's mask of that shape;
    ``None`` when both are ``None``."""
    if model_mask is None:
        return None if padding is None else padding.view(1, -1)  # (K,) -> (1, K)
    if padding is None:
        return model_mask
    if model_mask.dtype == torch.bool:
        return model_mask & padding  # (Bm, [Q,] K) & (K,) -> (Bm, [Q,] K)
    return model_mask.masked_fill(~padding, float("-inf"))  # additive: padded keys -> -inf


def mask_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (Bm, K) or (Bm, Q, K) bool or additive mask as an additive (Bm, 1, 1 or Q, K) bias of ``dtype``."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(dtype)
    return as_4d(bias)


def as_4d(mask: Tensor) -> Tensor:
    """(K,) / (Bm, K) / (Bm, Q, K) -> (Bm, 1, 1 or Q, K), broadcastable over heads (and queries)."""
    if mask.dim() == 3:
        return mask.unsqueeze(1)  # (Bm, Q, K) -> (Bm, 1, Q, K)
    return mask.view(-1, 1, 1, mask.shape[-1])  # (Bm, K) -> (Bm, 1, 1, K)


def has_keys(mask: Tensor | None) -> bool:
    """Whether a (Bm, K) mask lets any key through (``None``: all keys are valid)."""
    if mask is None:
        return True
    return bool(mask.any()) if mask.dtype == torch.bool else bool((mask > float("-inf")).any())


def shard_key_masks(
    state: ShardingState, order: tuple[str, ...], attn_mask: Tensor | None, device: torch.device, where: str
) -> Callable[..., Tensor | None]:
    """``key_valid(shards, query_shards=None)`` for one sharded attention call over the sequences ``order``: the mask
    of the keys of the given shards, (Bm, n * L), or with a query part, (Bm, m * L, n * L) for the queries of
    ``query_shards``; from the sharding padding and the model's own ``attn_mask`` (gathered here, once per call, from
    every shard: key part, query part and a flag in one message); ``None`` when every key is valid.

    Raises:
        NotImplementedError: on every rank of the group when any rank's mask cannot be honoured exactly.
    """
    keys = rows = None
    if attn_mask is not None:
        local = state.local_length(order)
        read = local_key_mask(attn_mask, local, where)
        bm = read.keys.shape[0]
        flags = [read.problem is not None, read.rank_one_problem is not None, read.has_neg_inf]  # (3,)
        parts = [read.keys.float(), read.keys.new_tensor(flags, dtype=torch.float32).expand(bm, 3)]
        if read.rows is not None:
            parts.append(read.rows)
        gathered = gather_key_mask(torch.cat(parts, dim=1), state.groups)  # (Bm, N, L + 3 [+ L])
        key_failed, rank_one_failed, neg_inf = (gathered[:, :, local + i].amax(dim=0) > 0 for i in range(3))  # (N,)
        # a float mask with -inf anywhere masks keys (rows that carry no bias locally may carry -inf elsewhere);
        # one without is read as the rank-1 product u_q * v_k
        as_rank_one = read.rows is not None and not bool(neg_inf.any())
        failed = (rank_one_failed if as_rank_one else key_failed).nonzero().flatten().tolist()
        if failed:
            mine = read.rank_one_problem if as_rank_one else read.problem
            raise NotImplementedError(
                f"{where}: sequence-parallel attention supports key-padding masks (and rank-1 0/1 float biases) only;"
                f" the attn_mask on shard(s) {failed} is {mine or 'not one of them'}, which a sharded sequence cannot"
                " reproduce exactly."
            )
        keys = gathered[:, :, :local]  # (Bm, N, L)
        keys = keys.bool() if read.keys.dtype == torch.bool else keys.to(read.keys.dtype)
        if as_rank_one:
            rows = gathered[:, :, local + 3 :].to(read.keys.dtype)  # (Bm, N, L)

    def key_valid(shards: list[int], query_shards: list[int] | None = None) -> Tensor | None:
        shard_masks = None if keys is None else keys[:, shards].flatten(1)  # (Bm, N, L) -> (Bm, n * L)
        if rows is not None:
            if query_shards is None:
                raise RuntimeError(f"{where}: this attn_mask has a query part; the kernel must name its query shards.")
            query_rows = rows[:, query_shards].flatten(1)  # (Bm, N, L) -> (Bm, m * L)
            shard_masks = query_rows[:, :, None] * shard_masks[:, None, :]  # u_q * v_k: (Bm, m * L, n * L)
        return combine_key_masks(state.key_valid(order, shards, device), shard_masks)

    return key_valid
