"""Sequence-parallel replacement for ``F.scaled_dot_product_attention`` (Ulysses, Ring and USP).

USP is the 2-D composition: an all-to-all inside each Ulysses group turns sequence shards into head
shards of a larger sequence block, ring attention runs over those blocks across the ring groups, and
the inverse all-to-all restores the sequence shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_dit_parallel.parallel.sequence.backends import LSEFallback, local_attend, local_attend_with_lse
from lightning_dit_parallel.parallel.sequence.comm import group_rank
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.ring import ring_attention
from lightning_dit_parallel.parallel.sequence.ulysses import (
    HeadsToSequence,
    QKVToHeads,
    UlyssesOverlap,
    check_heads,
    overlap_head_groups,
    ulysses_attention,
)

#: torch's kernel (nothing replaces it: attention is routed per module and thread, ``utils/attention_route.py``).
local_sdpa = F.scaled_dot_product_attention

#: key_valid(key_shards, query_shards) -> (Bm, len(key_shards) * local tokens) key mask, or (Bm, len(query_shards) *
#: local, len(key_shards) * local) with a query part (bool or additive, see ``masks.py``); None when every key is valid.
ShardMaskFn = Callable[..., "Tensor | None"]


def sequence_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    groups: SequenceGroups,
    key_valid: ShardMaskFn,
    scale: float | None,
    where: str,
    backend: Any = None,
    lse_fallback: LSEFallback = "warn",
    overlap: UlyssesOverlap = "auto",
) -> Tensor:
    """Attention of this rank's query shard over the whole sharded sequence.

    Args:
        q, k, v: (B, H, S_local, D) this rank's shard, all heads.
        groups: the Ulysses and ring groups.
        key_valid: real-token mask for the concatenation of the given sequence-parallel shards.
        scale: softmax scale.
        where: the attention module's path, for error messages.
        backend: the diffusers attention backend of the local attention (``None``: torch's SDPA); see ``backends.py``.
        lse_fallback: a backend without log-sum-exp under Ring: ``"warn"`` once and use torch's kernel, or ``"error"``.
        overlap: Ulysses alone (no ring): process the heads in groups whose all-to-alls overlap the attention of the
            others (``ulysses.UlyssesOverlap``); the ring path of USP does one all-to-all each way.

    Returns:
        (B, H, S_local, D), equal to this shard's rows of attention over the unsharded sequence.
    """
    u, r = groups.ulysses_size, groups.ring_size
    check_heads(q.shape[1], u, groups.size, where)
    if not q.shape == k.shape == v.shape:
        raise NotImplementedError(
            f"{where}: sequence-parallel self-attention needs q, k, v of one shape; got {tuple(q.shape)},"
            f" {tuple(k.shape)}, {tuple(v.shape)}."
        )

    def shards_of(block: int) -> list[int]:  # the sequence-parallel shards a ring block holds after the all-to-all
        return [block * u + i for i in range(u)]

    own_block = group_rank(groups.ring)  # the queries stay on their ring block

    def ring_block_valid(block: int) -> Tensor | None:
        return key_valid(shards_of(block), query_shards=shards_of(own_block))

    if r == 1:
        head_groups = overlap_head_groups(overlap, q.shape[1] // u, q.device.type, where)  # before any collective
        return ulysses_attention(
            q,
            k,
            v,
            groups.ulysses,
            ring_block_valid(0),
            scale,
            attention=local_attend(backend, where),
            head_groups=head_groups,
        )
    assert groups.ring is not None
    attend = local_attend_with_lse(backend, where, lse_fallback)  # may refuse: before any collective
    q, k, v = QKVToHeads(q, k, v, groups.ulysses).wait()  # 3 x (B, H, S/N, D) -> 3 x (B, H/U, S*U/N, D)
    out = ring_attention(q, k, v, groups.ring, ring_block_valid, scale, attend)
    return HeadsToSequence(out, groups.ulysses).wait()  # (B, H/U, S*U/N, D) -> (B, H, S/N, D)


def unsupported_sdpa_arguments(dropout_p, is_causal, enable_gqa) -> list[str]:
    """Arguments of an intercepted attention call that sequence parallelism cannot honour exactly (an ``attn_mask``
    is checked by ``masks.local_key_mask``)."""
    problems = []
    if dropout_p:
        problems.append(f"dropout_p={dropout_p}")
    if is_causal:
        problems.append("is_causal=True")
    if enable_gqa:
        problems.append("enable_gqa=True")
    return problems
