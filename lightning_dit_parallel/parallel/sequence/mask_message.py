"""A model's ``attn_mask`` read on every shard in one message, for kernels that keep keys and values of other shards
or of other calls (PipeFusion's caches, DistriFusion's stale keys): they need the mask of each shard's keys as data.

A rank reads its local mask (``masks.local_key_mask``) and packs the key part, whether it can be honoured, and the
query part of a rank-1 float bias into one (Bm, W) float32 tensor; the caller gathers it over the sequence-parallel
group (now, or asynchronously for a later step) and unpacks the gathered (Bm, N, W) into every shard's key bias. The
decisions are those of ``masks.shard_key_masks``: every rank decides from the same gathered data, so every rank
raises the same error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dit_parallel.parallel.sequence.masks import LocalMask, local_key_mask

#: flags packed after the key part: the key reading failed, the rank-1 reading failed, the mask holds -inf
_FLAGS = 3


def pack_local_mask(attn_mask: Tensor, width: int, where: str) -> tuple[Tensor, LocalMask]:
    """This rank's reading of its local mask as one message: (Bm, L + 3), or (Bm, 2 L + 3) with a query part.

    Args:
        attn_mask: the mask the model passed, over this rank's ``width`` local queries and keys.
        width: local tokens of the attention call.
        where: the attention module's path, for error messages.
    """
    read = local_key_mask(attn_mask, width, where)
    bm = read.keys.shape[0]
    flags = [read.problem is not None, read.rank_one_problem is not None, read.has_neg_inf]  # (3,)
    parts = [read.keys.float(), read.keys.new_tensor(flags, dtype=torch.float32).expand(bm, _FLAGS)]
    if read.rows is not None:
        parts.append(read.rows.float())
    return torch.cat(parts, dim=1), read  # (Bm, L + 3 [+ L])


def unpack_masks(
    gathered: Tensor, read: LocalMask, width: int, dtype: torch.dtype, where: str, what: str
) -> tuple[Tensor, Tensor | None]:
    """Every shard's key bias from the gathered messages (Bm, N, W).

    Returns:
        ``(keys, rows)``: ``keys`` (Bm, N, L) additive bias of ``dtype`` (bool masks become 0 / -inf); ``rows``
        (Bm, N, L) the queries' 0/1 part of a rank-1 float bias ``u_q * v_k``, or ``None`` for a key mask.

    Raises:
        NotImplementedError: when any shard's mask is neither a key mask nor a rank-1 0/1 float bias.
    """
    key_failed, rank_one_failed, neg_inf = (gathered[:, :, width + i].amax(dim=0) > 0 for i in range(_FLAGS))  # (N,)
    # a float mask with -inf anywhere masks keys; one without is read as the rank-1 product u_q * v_k
    as_rank_one = read.rows is not None and not bool(neg_inf.any())
    failed = (rank_one_failed if as_rank_one else key_failed).nonzero().flatten().tolist()
    if failed:
        mine = read.rank_one_problem if as_rank_one else read.problem
        raise NotImplementedError(
            f"{where}: {what} supports key-padding masks (and rank-1 0/1 float biases) only; the attn_mask on shard(s)"
            f" {failed} is {mine or 'not one of them'}, which keys kept from other shards or calls cannot reproduce."
        )
    keys = gathered[:, :, :width]  # (Bm, N, L)
    if read.keys.dtype == torch.bool:
        keys = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(keys == 0, float("-inf"))
    else:
        keys = keys.to(dtype)
    rows = gathered[:, :, width + _FLAGS :].to(dtype) if as_rank_one else None
    return keys, rows
