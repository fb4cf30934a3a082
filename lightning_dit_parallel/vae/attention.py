"""Attention over every band's tokens: the queries stay with their band, keys and values are gathered.

A VAE's attention (the decoder's mid-block, at the latent's resolution) flattens a band's rows into tokens in
row-major order, so band ``i``'s tokens are rows ``[start_i, stop_i)`` times the width: concatenating the bands'
keys and values in band order gives those of the whole image in its own order. Each rank attends with its own
queries over all of them, which equals its rows of the one-process attention.

Traffic: ``(N - 1)`` times this band's keys and values (one all-gather of both), at the lowest resolution of the
decoder; memory: the whole image's keys and values on every rank for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dit_parallel.vae.bands import BandGroup, Bands
from lightning_dit_parallel.vae.comm import gather_bands


def band_attention(
    local_sdpa: Callable[..., Tensor], band: BandGroup, bands: Callable[[str], Bands], where: str
) -> Callable[..., Tensor]:
    """A replacement for ``F.scaled_dot_product_attention`` inside one attention module of a banded decoder.

    Args:
        local_sdpa: the unpatched kernel, called with the gathered keys and values.
        band: the ranks holding the other bands.
        bands: returns the cut of the decoder call in progress (raises outside one).
        where: the attention module's path, for messages.
    """

    def attention(
        query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
        is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
    ) -> Tensor:
        problems = [text for text, bad in (
            ("attn_mask", attn_mask is not None), (f"dropout_p={dropout_p}", bool(dropout_p)),
            ("is_causal=True", is_causal), ("enable_gqa=True", enable_gqa),
        ) if bad]
        if problems:
            raise ValueError(
                f"{where}: the parallel VAE decode attends over all bands without masks; this attention call passes"
                f" {', '.join(problems)}."
            )
        cut = bands(where)
        tokens = query.shape[-2]
        if not key.shape[-2] == value.shape[-2] == tokens:
            raise ValueError(
                f"{where}: banded attention needs as many keys as queries per band; got {tuple(query.shape)},"
                f" {tuple(key.shape)}, {tuple(value.shape)}."
            )
        own = cut.rows[cut.rank]
        per_row, rest = divmod(tokens, own)
        if rest:
            raise RuntimeError(f"{where}: {tokens} tokens are not whole rows of this band's {own} latent rows.")
        counts = [r * per_row for r in cut.rows]  # every band's tokens, in band order
        kv = torch.stack([key, value])  # 2 x (..., S_band, D) -> (2, ..., S_band, D)
        kv = gather_bands(kv, kv.dim() - 2, counts, band)  # (2, ..., S_band, D) -> (2, ..., S, D)
        return local_sdpa(query, kv[0], kv[1], scale=scale)  # (..., S_band, D)

    return attention
