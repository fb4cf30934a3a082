"""Bands: the rows of a decoder's input that each rank of a group decodes, and how they grow with upsampling.

The latent's height is cut into contiguous bands, one per rank in group order; the first ``height % N`` bands take
one row more. The decoder only upsamples (by integer factors along the height), so at every layer each band holds
the same multiple ``s`` of its latent rows: a rank learns ``s`` from its own tensor, and every band's rows at that
layer from the latent rows that all ranks computed alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup


def band_rows(height: int, parts: int) -> tuple[int, ...]:
    """Rows of each of ``parts`` contiguous bands of ``height`` rows; the first ``height % parts`` take one more.

    Raises:
        ValueError: when a band would have no row (``height < parts``); the message names both values.
    """
    if height < parts:
        raise ValueError(
            f"A latent of height {height} cannot be cut into {parts} bands (one per rank of the parallel VAE group):"
            f" every band needs at least one row. Decode latents of height >= {parts}, or use a model-parallel group"
            f" of at most {height} ranks (or parallel_vae=False)."
        )
    base, extra = divmod(height, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


@dataclass(frozen=True)
class BandGroup:
    """The ranks that decode one sample together; band ``i`` is decoded by group rank ``i``.

    Attributes:
        group: the process group (the model-parallel ranks of one data-parallel index).
        rank: this rank's band.
        ranks: the global rank of every band, in band order.
    """

    group: ProcessGroup
    rank: int
    ranks: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def of(cls, group: ProcessGroup) -> BandGroup:
        """The band group of ``group`` (no communication)."""
        size = dist.get_world_size(group)
        return cls(group, dist.get_rank(group), tuple(dist.get_global_rank(group, r) for r in range(size)))


@dataclass(frozen=True)
class Bands:
    """How the decoder call in progress is cut: the rows of every band of its input (the latent).

    Attributes:
        rows: rows of each band at the decoder's input, in band order.
        rank: this rank's band.
        dim: the tensor dim of the height (negative: counted from the end, so that it holds for 4-D and 5-D tensors).
    """

    rows: tuple[int, ...]
    rank: int
    dim: int

    @property
    def height(self) -> int:
        return sum(self.rows)

    @property
    def start(self) -> int:
        """This band's first row of the decoder's input."""
        return sum(self.rows[: self.rank])

    def scale(self, local_rows: int, where: str) -> int:
        """The upsampling factor ``s`` at a layer where this band has ``local_rows`` rows.

        Raises:
            RuntimeError: when ``local_rows`` is not a whole multiple of the band's input rows (an operation inside
                the decoder changed the height other than by an integer upsampling; bands would not line up).
        """
        own = self.rows[self.rank]
        s, rest = divmod(local_rows, own)
        if rest or s < 1:
            raise RuntimeError(
                f"{where}: this band has {local_rows} rows, not a whole multiple of its {own} rows at the decoder's"
                " input; the parallel VAE decode needs every layer to keep the height or upsample it by an integer."
            )
        return s

    def rows_at(self, local_rows: int, where: str) -> tuple[int, ...]:
        """Rows of every band at a layer where this band has ``local_rows`` rows."""
        s = self.scale(local_rows, where)
        return tuple(r * s for r in self.rows)
