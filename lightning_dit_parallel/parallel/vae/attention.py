"""Attention over every band's tokens: the queries stay with their band, keys and values are gathered.

A VAE's attention (the decoder's mid-block, at the latent's resolution) flattens a band's rows into tokens in
row-major order, so band ``i``'s tokens are rows ``[start_i, stop_i)`` times the width: concatenating the bands'
keys and values in band order gives those of the whole image in its own order. Each rank attends with its own
queries over all of them, which equals its rows of the one-process attention.

Video attention over frames (HunyuanVideo's mid block: tokens ordered frame, row, column, with a block-causal mask
over frames) is declared with ``VaeCut.attention_masks="frame_causal"``: a band's tokens are then ``T`` runs of its
rows, one per frame. The number of frames is read from the mask (the first query, of frame 0, sees the keys of frame
0 only) and the mask checked to be exactly that form; the gathered keys and values are put back in the whole video's
order (frame, then the bands' rows) and the mask rebuilt for this band's queries against all of them.

Traffic: ``(N - 1)`` times this band's keys and values (one all-gather of both), at the lowest resolution of the
decoder; memory: the whole image's keys and values on every rank for the duration of the call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dit_parallel.parallel.vae.bands import BandGroup, Bands
from lightning_dit_parallel.parallel.vae.comm import gather_bands


def band_attention(
    local_sdpa: Callable[..., Tensor],
    band: BandGroup,
    bands: Callable[[str], Bands],
    where: str,
    masks: str = "none",
) -> Callable[..., Tensor]:
    """A replacement for ``F.scaled_dot_product_attention`` inside one attention module of a banded decoder.

    Args:
        local_sdpa: the unpatched kernel, called with the gathered keys and values.
        band: the ranks holding the other bands.
        bands: returns the cut of the decoder call in progress (raises outside one).
        where: the attention module's path, for messages.
        masks: ``"none"`` (a mask is refused) or ``"frame_causal"`` (``VaeCut.attention_masks``).
    """

    def attention(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        frame_masked = masks == "frame_causal" and attn_mask is not None
        problems = [
            text
            for text, bad in (
                ("attn_mask", attn_mask is not None and not frame_masked),
                (f"dropout_p={dropout_p}", bool(dropout_p)),
                ("is_causal=True", is_causal),
                ("enable_gqa=True", enable_gqa),
            )
            if bad
        ]
        if problems:
            raise ValueError(
                f"{where}: the parallel VAE decode attends over all bands without masks (or with the frame-causal"
                f" masks its VaeCut declares); this attention call passes {', '.join(problems)}."
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
        frames = _frames_of(attn_mask, tokens, where) if frame_masked else 1  # before any collective
        if any(count % frames for count in counts):
            raise ValueError(f"{where}: bands of {counts} tokens do not hold {frames} frames each.")
        kv = torch.stack([key, value])  # 2 x (..., S_band, D) -> (2, ..., S_band, D)
        kv = gather_bands(kv, kv.dim() - 2, counts, band)  # (2, ..., S_band, D) -> (2, ..., S, D)
        if not frame_masked:
            return local_sdpa(query, kv[0], kv[1], scale=scale)  # (..., S_band, D)
        kv = _frame_major(kv, counts, frames)  # (2, ..., S, D): frame, then every band's rows
        mask = _frame_causal_mask(tokens, sum(counts), frames, attn_mask)  # (S_band, S)
        return local_sdpa(query, kv[0], kv[1], attn_mask=mask, scale=scale)  # (..., S_band, D)

    return attention


def _frames_of(mask: Tensor, tokens: int, where: str) -> int:
    """The number of frames of a block-causal frame mask over ``tokens`` tokens, checked to be exactly that mask.

    Raises:
        ValueError: for any other mask (the banded attention would not reproduce it).
    """
    if mask.shape[-2:] != (tokens, tokens):
        raise ValueError(f"{where}: an attention mask of shape {tuple(mask.shape)} for {tokens} tokens per band.")
    allowed = _allowed(mask)  # (..., S_band, S_band) bool
    per_frame = int(allowed[(0,) * (allowed.dim() - 1)].sum())  # keys that the first query (frame 0) sees
    frames, rest = divmod(tokens, max(per_frame, 1))
    expected = _frame_causal_mask(tokens, tokens, frames, None) if not rest else None
    if expected is None or not bool((allowed == expected).all()):
        raise ValueError(
            f"{where}: VaeCut.attention_masks='frame_causal', but this attention mask is not block-causal over frames"
            f" of equal size (the first query sees {per_frame} of {tokens} keys)."
        )
    return frames


def _allowed(mask: Tensor) -> Tensor:
    """Which keys each query attends to, from a boolean or an additive mask."""
    return mask if mask.dtype == torch.bool else mask > float("-inf")


def _frame_causal_mask(queries: int, keys: int, frames: int, like: Tensor | None) -> Tensor:
    """(queries, keys): query ``i`` (frame ``i // (queries / frames)``) sees the keys of its own and earlier frames
    (keys in frame-major order). Boolean without ``like``; else additive (0 / -inf) in ``like``'s dtype, or boolean
    where ``like`` is."""
    device = like.device if like is not None else None
    query_frame = torch.arange(queries, device=device) // (queries // frames)  # (S_q,)
    key_frame = torch.arange(keys, device=device) // (keys // frames)  # (S_k,)
    allowed = key_frame[None, :] <= query_frame[:, None]  # (S_q, S_k)
    if like is None or like.dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=like.dtype, device=device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=like.dtype, device=device))


def _frame_major(kv: Tensor, counts: list[int], frames: int) -> Tensor:
    """Gathered keys and values in band order put in the whole video's token order.

    (2, ..., sum(counts), D) band-major, each band ``frames`` runs of ``counts[i] / frames`` tokens
    -> (2, ..., sum(counts), D) frame-major: per frame, every band's tokens of that frame in band order.
    """
    dim = kv.dim() - 2
    parts = kv.split(counts, dim=dim)  # N x (2, ..., counts[i], D)
    # (2, ..., counts[i], D) -> (2, ..., T, counts[i] / T, D); concatenated per frame -> (2, ..., T, S / T, D)
    per_frame = torch.cat([p.unflatten(dim, (frames, -1)) for p in parts], dim=dim + 1)
    return per_frame.flatten(dim, dim + 1)  # (2, ..., T, S / T, D) -> (2, ..., S, D)
