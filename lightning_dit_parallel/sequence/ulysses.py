"""Ulysses sequence parallelism: all-to-all between the sequence dim and the heads dim.

Before attention every rank holds all heads of its sequence shard; one all-to-all gives it H/U heads of
the whole sequence, attention runs locally, and the inverse all-to-all restores the sequence shard.
Per layer and rank this moves 4/U of the q, k, v and output activations, split across U peers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_dit_parallel.sequence.comm import PendingAllToAll, group_size
from lightning_dit_parallel.sequence.masks import as_4d


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


class QKVToHeads:
    """Start the all-to-all of queries, keys and values (one message); ``wait()`` returns them re-laid out.

    3 x (B, H, S/U, D) with all heads of this rank's shard -> 3 x (B, H/U, S, D) with this rank's heads of the
    whole sequence, shards in rank order.
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None) -> None:
        self.u = group_size(group)
        self.shape = q.shape
        if self.u == 1:
            self._pending = None
            self._qkv = (q, k, v)
            return
        b, h, s, d = q.shape
        x = torch.stack([q, k, v])  # 3 x (B, H, S/U, D) -> (3, B, H, S/U, D)
        x = x.reshape(3, b, self.u, h // self.u, s, d).permute(2, 0, 1, 3, 4, 5)  # -> (U, 3, B, H/U, S/U, D)
        self._pending = PendingAllToAll(x, group)  # head chunk i to rank i; row j comes from rank j's shard

    def wait(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._pending is None:
            return self._qkv
        b, h, s, d = self.shape
        x = self._pending.wait()  # (U, 3, B, H/U, S/U, D)
        x = x.permute(1, 2, 3, 0, 4, 5).reshape(3, b, h // self.u, self.u * s, d)  # -> (3, B, H/U, S, D)
        return x[0], x[1], x[2]


class HeadsToSequence:
    """Start the inverse all-to-all; ``wait()`` returns (B, H, S/U, D): all heads of this rank's shard.

    Input: (B, H/U, S, D), this rank's heads of the whole sequence.
    """

    def __init__(self, x: Tensor, group: ProcessGroup | None) -> None:
        self.u = group_size(group)
        self.shape = x.shape
        b, hu, s, d = x.shape
        if self.u > 1:
            x = x.reshape(b, hu, self.u, s // self.u, d).permute(2, 0, 1, 3, 4)  # -> (U, B, H/U, S/U, D)
        self._pending = PendingAllToAll(x, group)  # sequence shard j to rank j; row i is rank i's head chunk

    def wait(self) -> Tensor:
        x = self._pending.wait()
        if self.u == 1:
            return x
        b, hu, s, d = self.shape
        return x.permute(1, 0, 2, 3, 4).reshape(b, self.u * hu, s // self.u, d)  # (U, B, H/U, S/U, D) -> (B, H, S/U, D)


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup | None, key_valid: Tensor | None, scale: float | None,
    attention=None,
) -> Tensor:
    """Ulysses attention with communication overlapped: heads are processed in two halves when they split so,
    the all-to-all of one half travelling while the other half's attention runs.

    Args:
        q, k, v: (B, H, S/U, D) this rank's shard, all heads.
        group: the Ulysses group.
        key_valid: (Bm, S) mask of the keys of the whole sequence, or (Bm, S, S) with a query part (shards in rank
            order; bool or additive, see ``masks.py``); ``None`` when every key is valid.
        scale: softmax scale.
        attention: the local attention kernel (``F.scaled_dot_product_attention``'s signature).

    Returns:
        (B, H, S/U, D).
    """
    attention = torch.nn.functional.scaled_dot_product_attention if attention is None else attention
    u = group_size(group)
    chunks = 2 if q.shape[1] % (2 * u) == 0 else 1
    mask = None if key_valid is None else as_4d(key_valid)  # (Bm, [S,] S) -> (Bm, 1, 1 or S, S)
    halves = list(zip(q.chunk(chunks, dim=1), k.chunk(chunks, dim=1), v.chunk(chunks, dim=1)))  # heads split
    incoming = QKVToHeads(*halves[0], group)
    outgoing: list[HeadsToSequence] = []
    for i in range(chunks):
        qi, ki, vi = incoming.wait()  # 3 x (B, H/(c*U), S, D)
        if i + 1 < chunks:
            incoming = QKVToHeads(*halves[i + 1], group)  # travels while this half's attention runs
        out = attention(qi, ki, vi, attn_mask=mask, scale=scale)  # (B, H/(c*U), S, D)
        outgoing.append(HeadsToSequence(out, group))
    return torch.cat([o.wait() for o in outgoing], dim=1)  # c x (B, H/c, S/U, D) -> (B, H, S/U, D)
