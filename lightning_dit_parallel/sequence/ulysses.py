"""Ulysses sequence parallelism: all-to-all between the sequence dim and the heads dim.

Before attention every rank holds all heads of its sequence shard; one all-to-all gives it H/U heads of
the whole sequence, attention runs locally, and the inverse all-to-all restores the sequence shard.
Per layer and rank this moves 4/U of the q, k, v and output activations, split across U peers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_dit_parallel.sequence.comm import all_to_all_dim0, group_size


def check_heads(num_heads: int, ulysses: int, sequence_degree: int, where: str) -> None:
    """Raise a ValueError, with a working suggestion, when heads do not split over the Ulysses degree."""
    if num_heads % ulysses == 0:
        return
    workable = [u for u in range(1, sequence_degree + 1) if sequence_degree % u == 0 and num_heads % u == 0]
    best = max(workable)
    raise ValueError(
        f"{where}: {num_heads} attention heads cannot be split over ulysses_degree={ulysses}. With"
        f" {sequence_degree} sequence-parallel ranks, use ulysses_degree={best}, ring_degree={sequence_degree // best}"
        " (ring attention has no constraint on heads)."
    )


def qkv_sequence_to_heads(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor]:
    """One all-to-all for queries, keys and values: 3 x (B, H, S/U, D) with all heads -> 3 x (B, H/U, S, D)
    with this rank's heads, shards in rank order."""
    u = group_size(group)
    if u == 1:
        return q, k, v
    b, h, s, d = q.shape
    x = torch.stack([q, k, v])  # 3 x (B, H, S/U, D) -> (3, B, H, S/U, D)
    x = x.reshape(3, b, u, h // u, s, d).permute(2, 0, 1, 3, 4, 5)  # -> (U, 3, B, H/U, S/U, D)
    x = all_to_all_dim0(x, group)  # head chunk i to rank i; x[j] is now rank j's sequence shard
    x = x.permute(1, 2, 3, 0, 4, 5).reshape(3, b, h // u, u * s, d)  # (U, 3, B, H/U, S/U, D) -> (3, B, H/U, S, D)
    return x[0], x[1], x[2]


def heads_to_sequence(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """(B, H/U, S, D) with this rank's heads -> (B, H, S/U, D) with all heads of this rank's shard."""
    u = group_size(group)
    if u == 1:
        return x
    b, hu, s, d = x.shape
    x = x.reshape(b, hu, u, s // u, d).permute(2, 0, 1, 3, 4)  # (B, H/U, S, D) -> (U, B, H/U, S/U, D)
    x = all_to_all_dim0(x, group)  # sequence shard j to rank j; x[i] is now rank i's head chunk
    return x.permute(1, 0, 2, 3, 4).reshape(b, u * hu, s // u, d)  # (U, B, H/U, S/U, D) -> (B, H, S/U, D)
