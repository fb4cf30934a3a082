"""Cutting token sequences into per-rank shards (with padding) and gathering them back.

A sequence of ``length`` tokens on ``n`` sequence-parallel ranks is padded with zeros to ``n * local``
tokens, ``local = ceil(length / n)``, and rank ``i`` keeps tokens ``[i * local, (i + 1) * local)``.
Padded tokens are masked out of every sharded attention, so the result is exact at any length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_dit_parallel.parallel.sequence.comm import all_gather_dim
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.plan import Split


@dataclass(frozen=True)
class ShardedSequence:
    """Sizes of one token sequence cut over ``shards`` ranks."""

    length: int
    shards: int

    @property
    def local(self) -> int:
        """Tokens per rank, padding included."""
        return -(-self.length // self.shards)

    @property
    def padded(self) -> bool:
        return self.local * self.shards != self.length

    def valid_in(self, shard: int) -> int:
        """How many real (not padded) tokens shard ``shard`` holds."""
        return max(0, min(self.local, self.length - shard * self.local))


@dataclass
class ShardingState:
    """The sequences cut during one forward of a DiT, by name. Created fresh for every forward."""

    groups: SequenceGroups
    sequences: dict[str, ShardedSequence] = field(default_factory=dict)
    #: how each cut tensor was laid out: (its number of dims, the cut dim, the sequence), for ``padding_rows``
    cuts: set[tuple[int, int, str]] = field(default_factory=set)

    def split(self, x: Tensor, split: Split, where: str) -> Tensor:
        """This rank's shard of ``x`` along ``split.dim``: (..., S, ...) -> (..., ceil(S/N), ...)."""
        dim = split.dim % x.dim()
        seq = ShardedSequence(x.shape[dim], self.groups.size)
        known = self.sequences.setdefault(split.sequence, seq)
        if known != seq:
            raise ValueError(
                f"{where}: sequence {split.sequence!r} has {seq.length} tokens along dim {split.dim}, but it was"
                f" split earlier in this forward with {known.length} tokens; the plan's splits disagree."
            )
        self.cuts.add((x.dim(), dim, split.sequence))
        if seq.padded:
            pad_shape = list(x.shape)
            pad_shape[dim] = seq.local * seq.shards - seq.length
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)  # (..., S, ...) -> (..., N*local, ...)
        # (..., N*local, ...) -> (..., local, ...): this rank's shard
        return x.narrow(dim, self.groups.rank * seq.local, seq.local).contiguous()

    def gather(self, x: Tensor, split: Split, where: str) -> Tensor:
        """The whole sequence from every rank's shard: (..., ceil(S/N), ...) -> (..., S, ...)."""
        seq = self.sequences.get(split.sequence)
        if seq is None:
            raise RuntimeError(f"{where}: sequence {split.sequence!r} is gathered but was never split in this forward.")
        dim = split.dim % x.dim()
        if x.shape[dim] != seq.local:
            raise RuntimeError(
                f"{where}: expected {seq.local} local tokens of {split.sequence!r} along dim {split.dim}, got"
                f" shape {tuple(x.shape)}."
            )
        # Ulysses ranks are the inner axis: gather them first, then the ring blocks, so shards end up in
        # sequence-parallel rank order (ring_rank * ulysses + ulysses_rank).
        x = all_gather_dim(x, dim, self.groups.ulysses)  # (..., local, ...) -> (..., U*local, ...)
        x = all_gather_dim(x, dim, self.groups.ring)  # (..., U*local, ...) -> (..., N*local, ...)
        return x.narrow(dim, 0, seq.length)  # (..., N*local, ...) -> (..., S, ...): padding dropped

    def padding_rows(self, x: Tensor) -> tuple[int, int] | None:
        """Where this rank's tensor ``x`` (a shard laid out like a cut of this forward, e.g. a block's hidden states)
        holds padding tokens: ``(dim, real)``, the first ``real`` entries along ``dim`` being real tokens and the rest
        padding (the padding is appended to the whole sequence, so it ends every shard that holds some); ``None``
        when ``x`` holds none.

        ``x`` is recognized by shape: as many dims as a cut tensor of a padded sequence and that sequence's local
        length along the cut dim. ``None`` too when that is ambiguous (two cuts matching ``x`` with different real
        counts on this rank, e.g. two sequences of equal local length but different padding): then ``x`` is taken
        whole.
        """
        found = {
            (dim, self.sequences[name].valid_in(self.groups.rank))
            for ndim, dim, name in self.cuts
            if x.dim() == ndim and x.shape[dim] == self.sequences[name].local
        }
        if len(found) != 1:
            return None
        ((dim, real),) = found
        return (dim, real) if real < x.shape[dim] else None

    def whole_length(self, name: str) -> int | None:
        """The length of sequence ``name`` as the forward holds it before any cut (what a ``Concat``, a ``PrefixCount``
        or a folded split reads), or ``None`` when it has not been cut in this forward."""
        seq = self.sequences.get(name)
        return None if seq is None else seq.length

    def local_length(self, order: tuple[str, ...]) -> int:
        """Tokens one rank passes to an attention call whose sequence is ``order`` concatenated."""
        return sum(self._sequence(name).local for name in order)

    def key_valid(self, order: tuple[str, ...], shards: list[int], device: torch.device) -> Tensor | None:
        """Which keys are real for the concatenation of the given shards' local sequences.

        Returns a (len(shards) * local_length(order),) bool tensor, or ``None`` when none is padded.
        """
        seqs = [self._sequence(name) for name in order]
        if not any(seq.padded for seq in seqs):
            return None
        parts = []
        for shard in shards:
            for seq in seqs:
                part = torch.zeros(seq.local, dtype=torch.bool, device=device)
                part[: seq.valid_in(shard)] = True
                parts.append(part)
        return torch.cat(parts)  # len(shards) * len(order) x (local,) -> (len(shards) * local_length(order),)

    def _sequence(self, name: str) -> ShardedSequence:
        if name not in self.sequences:
            raise RuntimeError(
                f"An attention call expects sequence {name!r}, which has not been split in this forward; known:"
                f" {sorted(self.sequences)}. Check the plan's split points."
            )
        return self.sequences[name]
