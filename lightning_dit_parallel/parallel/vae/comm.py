"""Communication of the parallel VAE decode, kept apart from the layers: halo rows between neighbouring bands
(point-to-point) and gathering bands of unequal heights (all-gather)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dit_parallel.parallel.vae.bands import BandGroup


class PendingHalos:
    """Halo rows of every tensor of this band in flight from the neighbouring bands; ``wait()`` returns them.

    On construction, one batch of non-blocking point-to-point transfers with the two neighbours starts: this band
    sends its first ``bottom`` rows up and its last ``top`` rows down, and receives the band above's last ``top``
    rows and the band below's first ``bottom`` rows. Every rank posts them with the same ``top``, ``bottom`` and
    tensor count, so every send has its receive. Neighbouring bands must have at least ``max(top, bottom)`` rows
    (checked by the caller). At the image's top and bottom edges the halo is zero rows (a zero padding).

    ``wait()``: per tensor, (..., top, ...) from above and (..., bottom, ...) from below, along ``dim``.
    """

    def __init__(self, tensors: Sequence[Tensor], dim: int, top: int, bottom: int, band: BandGroup) -> None:
        above = band.ranks[band.rank - 1] if band.rank > 0 else None
        below = band.ranks[band.rank + 1] if band.rank + 1 < band.size else None
        ops: list[dist.P2POp] = []
        self.heads = [_rows_like(x, dim, top) for x in tensors]  # (..., top, ...): the band above's last rows
        self.tails = [_rows_like(x, dim, bottom) for x in tensors]  # (..., bottom, ...): the band below's first rows
        for x, head, tail in zip(tensors, self.heads, self.tails):
            rows = x.shape[dim]
            if above is not None:
                if bottom:
                    ops.append(dist.P2POp(dist.isend, x.narrow(dim, 0, bottom).contiguous(), above, group=band.group))
                if top:
                    ops.append(dist.P2POp(dist.irecv, head, above, group=band.group))
            if below is not None:
                if top:
                    send = x.narrow(dim, rows - top, top).contiguous()
                    ops.append(dist.P2POp(dist.isend, send, below, group=band.group))
                if bottom:
                    ops.append(dist.P2POp(dist.irecv, tail, below, group=band.group))
        self._ops = ops  # the sent tensors stay alive until the transfers are done
        self._requests = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> tuple[list[Tensor], list[Tensor]]:
        for request in self._requests:
            request.wait()
        self._requests, self._ops = [], []
        return self.heads, self.tails


def _rows_like(x: Tensor, dim: int, rows: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] = rows
    return x.new_zeros(shape)


def gather_bands(x: Tensor, dim: int, rows: Sequence[int], band: BandGroup) -> Tensor:
    """Concatenate every band's ``x`` along ``dim`` in band order; band ``i`` holds ``rows[i]`` entries there.

    Bands of unequal heights are padded to the tallest for one all-gather and trimmed after it.

    (..., rows[rank], ...) -> (..., sum(rows), ...).
    """
    if x.shape[dim] != rows[band.rank]:
        raise RuntimeError(
            f"gather_bands: this band has {x.shape[dim]} rows along dim {dim}, expected {rows[band.rank]}."
        )
    tallest = max(rows)
    if x.shape[dim] < tallest:
        x = torch.cat([x, _rows_like(x, dim, tallest - x.shape[dim])], dim=dim)  # (..., r, ...) -> (..., max, ...)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(band.size)]
    dist.all_gather(parts, x, group=band.group)  # (..., max, ...) from every band
    # N x (..., max, ...) -> (..., sum(rows), ...): each band's real rows, in band order
    return torch.cat([part.narrow(dim, 0, r) for part, r in zip(parts, rows)], dim=dim)
