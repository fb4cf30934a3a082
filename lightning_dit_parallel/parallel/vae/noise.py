"""Noise maps over bands: every band draws the whole map, as one process does, and keeps its rows.

LTX-Video 0.9.1's decoder adds ``torch.randn((height, width))`` noise, scaled per channel, inside its resnet blocks
(``inject_noise``). A band drawing a map of its own rows would consume the generator differently and get other
numbers. Inside the modules that ``VaeCut.noise`` names, ``torch.randn`` draws the map of the whole image's height
with the same arguments (generator, dtype, device), so the generator advances exactly as in one process on every rank,
and returns this band's rows of it. The draw is a ``(..., H, W)`` map, without channels: small next to the
activations.

diffusers' LTX decoder passes no generator: the maps come from the global random state, so the bands fit together
only when every rank's global state is the same. ``check_same_random_state`` compares a fingerprint of it across the
group at the start of every banded decoder call of such a VAE (one all-gather of one number) and raises on every rank
where they differ (e.g. a rank-dependent seed; ``lightning.seed_everything`` gives every rank the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dit_parallel.parallel.vae.bands import BandGroup, Bands


def band_noise(randn: Callable[..., Tensor], bands: Callable[[str], Bands], where: str) -> Callable[..., Tensor]:
    """A replacement for ``torch.randn`` inside one noise-drawing module of a banded decoder.

    Args:
        randn: the unpatched ``torch.randn``.
        bands: returns the cut of the decoder call in progress (raises outside one).
        where: the module's path, for messages.
    """

    def banded_randn(*size: int | Sequence[int], **kwargs) -> Tensor:
        if "size" in kwargs:
            size = (kwargs.pop("size"),)
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], Sequence) else tuple(size)
        if "out" in kwargs or len(shape) < 2:
            raise ValueError(
                f"{where}: the parallel VAE decode expects noise maps torch.randn((..., height, width)) here; got"
                f" size {shape}{' with out=' if 'out' in kwargs else ''}."
            )
        cut = bands(where)
        dim = cut.dim if -cut.dim <= len(shape) else -2
        rows = cut.rows_at(shape[dim], where)  # every band's rows of the map at this layer
        whole = list(shape)
        whole[dim] = sum(rows)
        noise = randn(tuple(whole), **kwargs)  # (..., H, W): the draw of one process
        return noise.narrow(dim, sum(rows[: cut.rank]), rows[cut.rank])  # (..., H, W) -> (..., rows, W)

    return banded_randn


def check_same_random_state(device: torch.device, band: BandGroup, where: str) -> None:
    """Raise on every rank of ``band`` unless all hold the same global random state for ``device`` (a collective).

    Raises:
        ValueError: naming the ranks whose state differs from the first band's.
    """
    if device.type == "cuda":
        state = torch.cuda.get_rng_state(device)
    else:
        state = torch.get_rng_state()
    weights = torch.arange(1, state.numel() + 1, dtype=torch.int64)
    fingerprint = (state.to(torch.int64) * weights).sum().view(1)  # (1,): a position-weighted checksum
    if device.type == "cuda":
        fingerprint = fingerprint.to(device)
    parts = [torch.empty_like(fingerprint) for _ in range(band.size)]
    dist.all_gather(parts, fingerprint, group=band.group)  # (1,) from every band
    differ = [band.ranks[i] for i, part in enumerate(parts) if not torch.equal(part, parts[0])]
    if differ:
        raise ValueError(
            f"{where} draws noise maps from the global random state, which differs on ranks {differ} from rank"
            f" {band.ranks[0]}: the bands would not fit together. Give every rank the same seed"
            " (lightning.seed_everything) and the same random calls before the decode."
        )
