"""Ulysses sequence parallelism: all-to-all between the sequence dim and the heads dim.

Before attention every rank holds all heads of its sequence shard; one all-to-all gives it H/U heads of
the whole sequence, attention runs locally, and the inverse all-to-all restores the sequence shard.
Per layer and rank this moves 4/U of the q, k, v and output activations, split across U peers.

Overlap (``ulysses_overlap``): the heads can be processed in groups, so that the all-to-all of one group travels
while the attention of another runs (``ulysses_attention``'s ``head_groups``). Same math, more and smaller messages.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_dit_parallel.parallel.sequence.comm import PendingAllToAll, group_size
from lightning_dit_parallel.parallel.sequence.masks import as_4d

#: ``False`` (or 1): one all-to-all each way per attention call; ``True``: 2 head groups; an int G >= 1: G head groups
#: (at most the H/U heads a rank attends to); ``"auto"``: what was measured faster on the device type
#: (``AUTO_HEAD_GROUPS``).
UlyssesOverlap = bool | int | Literal["auto"]

#: Head groups ``"auto"`` picks per device type, from ``bench/ulysses_overlap.py``. CPU (gloo, 2 ranks, 4096 tokens, 1
#: thread each): no gain from overlap - the all-to-all is ~5-8% of an attention call, and the grouped calls without
#: overlap are as fast as with it (1.04-1.05x both, from smaller kernels), the DiT forward 0.95-1.01x - so 1 (off).
#: Device types not measured (cuda/nccl included) also get 1 until a measurement says otherwise.
AUTO_HEAD_GROUPS: dict[str, int] = {"cpu": 1}


def check_overlap_option(option: object) -> None:
    """Raise a ValueError unless ``option`` is a valid ``UlyssesOverlap`` (at construction, before any collective)."""
    if isinstance(option, bool) or option == "auto":
        return
    if isinstance(option, int) and option >= 1:
        return
    raise ValueError(f"ulysses_overlap must be True, False, 'auto' or a number of head groups >= 1; got {option!r}.")


def overlap_head_groups(option: UlyssesOverlap, local_heads: int, device_type: str, where: str) -> int:
    """The number of head groups G for a rank attending to ``local_heads`` = H/U heads.

    ``True`` asks for 2 groups, fewer when there is one local head (nothing to overlap); an int G larger than
    ``local_heads`` is refused. Depends only on values every rank of the group holds alike.

    Raises:
        ValueError: for an int G > ``local_heads``, naming the module.
    """
    check_overlap_option(option)
    if option == "auto":
        return min(AUTO_HEAD_GROUPS.get(device_type, 1), local_heads)
    if isinstance(option, bool):
        return min(2, local_heads) if option else 1
    if option > local_heads:
        raise ValueError(
            f"{where}: ulysses_overlap={option} head groups, but each rank attends to {local_heads} heads (heads /"
            f" ulysses_degree); use at most {local_heads}, True (2 groups) or False."
        )
    return option


def head_group_sizes(heads: int, ulysses: int, groups: int) -> list[int]:
    """Split ``heads`` (a multiple of ``ulysses``) into ``groups`` contiguous groups of whole multiples of ``ulysses``,
    the first ``(heads / ulysses) % groups`` groups one multiple larger: e.g. 12 heads, U=2, G=4 -> [4, 4, 2, 2]."""
    local = heads // ulysses
    if not 1 <= groups <= local:
        raise ValueError(f"{groups} head groups cannot split {local} heads per rank ({heads} heads over {ulysses}).")
    return [ulysses * (local // groups + (1 if g < local % groups else 0)) for g in range(groups)]


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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: ProcessGroup | None,
    key_valid: Tensor | None,
    scale: float | None,
    attention=None,
    head_groups: int = 1,
) -> Tensor:
    """Ulysses attention, optionally with its communication overlapped with its attention.

    With ``head_groups`` G > 1 the heads are processed in G groups (contiguous, each a multiple of the Ulysses
    degree U; sizes differ by at most U when H/U does not divide by G): the all-to-all of group g+1's queries, keys
    and values travels while group g's attention runs, and group g's output all-to-all while group g+1 computes.
    Attention is independent per head, so the result is the plain one (same kernel, same values).

    Args:
        q, k, v: (B, H, S/U, D) this rank's shard, all heads.
        group: the Ulysses group.
        key_valid: (Bm, S) mask of the keys of the whole sequence, or (Bm, S, S) with a query part (shards in rank
            order; bool or additive, see ``masks.py``); ``None`` when every key is valid.
        scale: softmax scale.
        attention: the local attention kernel (``attend(q, k, v, attn_mask=, scale=)``; default torch's SDPA).
        head_groups: G, from 1 (no overlap: one all-to-all each way) to H/U (see ``overlap_head_groups``).

    Returns:
        (B, H, S/U, D).
    """
    attention = torch.nn.functional.scaled_dot_product_attention if attention is None else attention
    u = group_size(group)
    sizes = head_group_sizes(q.shape[1], u, head_groups)  # heads of each group, each a multiple of U
    mask = None if key_valid is None else as_4d(key_valid)  # (Bm, [S,] S) -> (Bm, 1, 1 or S, S)
    parts = list(zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1)))  # G x 3 x (B, H_g, S/U, D)
    incoming = QKVToHeads(*parts[0], group)
    outgoing: list[HeadsToSequence] = []
    for g in range(len(parts)):
        qg, kg, vg = incoming.wait()  # 3 x (B, H_g/U, S, D)
        if g + 1 < len(parts):
            incoming = QKVToHeads(*parts[g + 1], group)  # travels while this group's attention runs
        out = attention(qg, kg, vg, attn_mask=mask, scale=scale)  # (B, H_g/U, S, D)
        outgoing.append(HeadsToSequence(out, group))  # travels while the next group's attention runs
    if len(outgoing) == 1:
        return outgoing[0].wait()
    return torch.cat([o.wait() for o in outgoing], dim=1)  # G x (B, H_g, S/U, D) -> (B, H, S/U, D)
