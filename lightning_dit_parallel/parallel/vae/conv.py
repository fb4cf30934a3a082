"""Convolutions over bands: the halo rows from the neighbouring bands, fetched while the convolution runs.

A stride-1 convolution along the height with kernel ``k``, dilation ``d`` and padding ``p`` on top reads, for
output row ``i``, input rows ``i - p`` to ``i - p + d (k - 1)``. Run on a band with its own zero padding, it gets
every row right except the first ``p`` and the last ``d (k - 1) - p``, where the padding stood in for rows of the
neighbouring bands (at the image's top and bottom edges the zeros are right). So:

* a forward pre-hook starts the transfers: the band sends its first ``bottom = d (k - 1) - p`` rows to the band
  above and its last ``top = p`` rows to the band below, and receives theirs (non-blocking point-to-point, so they
  travel while the convolution runs on the band);
* a forward hook waits for them and recomputes the boundary rows from thin strips (``top`` received rows and the
  band's first ``top + bottom`` rows; the band's last ``top + bottom`` rows and ``bottom`` received rows), with the
  convolution's own forward and no padding along the height, and writes them into the output in place.

No tensor of the input's size is copied; the strips cost ``(top + bottom) / rows`` of the convolution's work. A band
with fewer than ``top + bottom`` rows (tiny latents on many ranks) is convolved again as a whole with both halos.
Every tensor argument is treated alike: the input and, for diffusers' causal 3-D convolutions, the cached frames of
the previous call (they hold the band's rows of earlier frames).

A convolution that pads in its own forward (``F.pad`` order padding in an attribute) may be a wrapper around an
unpadded ``nn.Conv*`` (HunyuanVideo's and Mochi's causal convolutions, ``F.pad`` in replicate mode): the hooks sit on
the wrapper, the strips run the wrapper's forward without the height's padding. Only the boundary rows between bands
are recomputed, so at the image's top and bottom edges the wrapper's own padding (zeros, replicate or reflect of the
edge band's rows) stands, as in one process.

Traffic per call: ``top`` rows down and ``bottom`` rows up per band boundary (a 3 x 3 convolution: one row each
way), independent of the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.vae.bands import BandGroup, Bands
from lightning_dit_parallel.parallel.vae.comm import PendingHalos


@dataclass
class ConvHalo:
    """One convolution's halo along the height, and its padding without the height's part.

    Attributes:
        path: the convolution's path inside the VAE.
        top, bottom: rows it needs from the band above and below.
        attribute: the attribute holding its padding (``padding``, or e.g. ``_padding`` in ``F.pad`` order).
        original: that attribute's value.
        unpadded: the same padding with 0 along the height (set only while a strip is convolved).
        pair: for a padding in ``F.pad`` order, the index of the height's (top, bottom) pair in it; ``None`` for
            ``nn.Conv*``'s ``padding`` (symmetric, zeros).
    """

    path: str
    top: int
    bottom: int
    attribute: str
    original: tuple
    unpadded: tuple
    pair: int | None = None
    handles: list[RemovableHandle] = field(default_factory=list)
    pending: PendingHalos | None = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.pending = None

    def convolve(self, module: nn.Module, args: list, kwargs: dict, padding: tuple | None = None) -> Tensor:
        """The convolution's own forward (no hooks) with ``padding`` (default: none along the height); its output
        tensor (the first element where the forward returns a tuple, e.g. with a cache)."""
        setattr(module, self.attribute, self.unpadded if padding is None else padding)
        try:
            return _first(module.forward(*args, **kwargs))
        finally:
            setattr(module, self.attribute, self.original)

    def edge_padding(self, above: bool, below: bool) -> tuple | None:
        """The padding with the height's own padding kept only at the image's edges (no band ``above`` / ``below``),
        for a padding in ``F.pad`` order; ``None`` for ``nn.Conv*``'s symmetric padding."""
        if self.pair is None:
            return None
        padding = list(self.unpadded)
        padding[self.pair] = 0 if above else self.top
        padding[self.pair + 1] = 0 if below else self.bottom
        return tuple(padding)


def conv_halo(
    module: _ConvNd, path: str, height_dim: int, padding_attribute: str | None, holder: nn.Module | None = None
) -> ConvHalo | None:
    """The halo of a convolution of a banded decoder, or ``None`` when it needs none (kernel height 1, no padding).
    Pure inspection: the module is not changed.

    Args:
        module: the convolution.
        path: the path of ``holder`` (or of ``module``), for messages.
        height_dim: the height's tensor dim, negative (``-2``).
        padding_attribute: for a convolution that pads in its own forward, the attribute with that padding in
            ``F.pad`` order; ``None`` for ``nn.Conv*``'s ``padding``.
        holder: a wrapper that holds ``padding_attribute`` and pads its input before calling ``module`` (which then
            must not pad the height); ``None``: ``module`` itself.

    Raises:
        ValueError: for a transposed or strided convolution along the height, padding other than zeros (circular for
            a wrapper's ``F.pad``), a ``padding="same"`` string, or padding that changes the height (the bands would
            not line up).
    """
    name = f"{path} ({type(holder if holder is not None else module).__name__})"
    spatial = len(module.kernel_size)
    if module.transposed or -height_dim > spatial:
        raise ValueError(f"The parallel VAE decode cannot band {name}: transposed or without a height dim.")
    axis = spatial + height_dim  # index of the height among the spatial dims
    kernel, dilation, stride = module.kernel_size[axis], module.dilation[axis], module.stride[axis]
    if stride != 1:
        raise ValueError(f"The parallel VAE decode cannot band {name}: stride {stride} along the height.")
    if padding_attribute is None:
        if isinstance(module.padding, str):
            if module.padding == "valid" and kernel == 1:
                return None
            raise ValueError(f"The parallel VAE decode cannot band {name}: padding={module.padding!r}; use integers.")
        attribute, original, pair = "padding", tuple(module.padding), None
        top = bottom = original[axis]
        unpadded = tuple(0 if i == axis else p for i, p in enumerate(original))
    else:
        owner = holder if holder is not None else module
        attribute, original = padding_attribute, tuple(getattr(owner, padding_attribute))
        pair = 2 * (-height_dim - 1)  # F.pad order: (last dim left, last dim right, next-to-last left, ...)
        top, bottom = original[pair], original[pair + 1]
        unpadded = tuple(0 if i in (pair, pair + 1) else p for i, p in enumerate(original))
        if holder is not None:
            if not isinstance(module.padding, str) and module.padding[axis]:
                raise ValueError(f"The parallel VAE decode cannot band {name}: its convolution pads the height too.")
            mode = getattr(holder, "pad_mode", None) or getattr(holder, "padding_mode", None)
            if mode == "circular":
                raise ValueError(f"The parallel VAE decode cannot band {name}: circular padding of the height.")
    if top + bottom != dilation * (kernel - 1):
        raise ValueError(
            f"The parallel VAE decode cannot band {name}: padding {top} + {bottom} along the height changes it"
            f" (kernel {kernel}, dilation {dilation})."
        )
    if top == bottom == 0:
        return None
    if module.padding_mode != "zeros":
        raise ValueError(f"The parallel VAE decode cannot band {name}: padding_mode={module.padding_mode!r}.")
    return ConvHalo(path, top, bottom, attribute, original, unpadded, pair)


def install_halo(
    module: nn.Module, halo: ConvHalo, height_dim: int, band: BandGroup, bands: Callable[[], Bands | None]
) -> None:
    """The two hooks of ``conv.py``'s docstring on ``module``. Outside a banded decoder call (``bands()`` is
    ``None``, e.g. the convolution run on its own) they do nothing: the convolution's own zero padding is right."""
    dim = height_dim
    needed = max(halo.top, halo.bottom)

    def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cut = bands()
        if cut is None:
            return
        tensors = _tensors(args, kwargs)
        rows = cut.rows_at(tensors[0].shape[dim], halo.path)
        if min(rows) < needed:  # every rank computes the same rows: all raise, before any transfer
            raise ValueError(
                f"{halo.path}: bands of {list(rows)} rows at this layer are too short for this convolution's"
                f" halo of {needed} rows (latent bands {list(cut.rows)} for a latent of height {cut.height} on"
                f" {len(cut.rows)} ranks). Decode taller latents or use fewer ranks."
            )
        halo.pending = PendingHalos(tensors, dim, halo.top, halo.bottom, band)

    def finish(module: nn.Module, args: tuple, kwargs: dict, output: Tensor | tuple) -> Tensor | tuple | None:
        pending, halo.pending = halo.pending, None
        if pending is None:
            return None
        heads, tails = pending.wait()  # each (..., top, ...) and (..., bottom, ...): neighbours' rows, or zeros
        args, kwargs = list(args), dict(kwargs)
        slots = _slots(args, kwargs)
        tensors = [holder[key] for holder, key in slots]
        rows, span = tensors[0].shape[dim], halo.top + halo.bottom
        above, below = band.rank > 0, band.rank + 1 < band.size
        result = _first(output)  # a wrapper's forward may return (output, cache): the cache is the band's own

        def convolve(pieces: list[Tensor], padding: tuple | None = None) -> Tensor:
            for (holder, key), piece in zip(slots, pieces):
                holder[key] = piece
            return halo.convolve(module, args, kwargs, padding)

        if rows < span:  # too thin for strips: the whole band again, with both halos
            padding = halo.edge_padding(above, below)
            if padding is None:  # nn.Conv* padding: zeros at the image's edges, i.e. the zero halos there
                # (..., top, ...) + (..., rows, ...) + (..., bottom, ...) -> (..., top + rows + bottom, ...)
                whole = convolve([torch.cat([h, t, b], dim=dim) for h, t, b in zip(heads, tensors, tails)])
            else:  # F.pad padding: the module's own at the image's edges, the neighbours' rows between bands
                # (..., [top], ...) + (..., rows, ...) + (..., [bottom], ...) -> (..., rows + halos, ...)
                whole = convolve(
                    [torch.cat([h] * above + [t] + [b] * below, dim=dim) for h, t, b in zip(heads, tensors, tails)],
                    padding,
                )
            return (whole, *output[1:]) if isinstance(output, tuple) else whole
        if above and halo.top:  # output rows [0, top) from (..., top + span, ...) -> (..., top, ...)
            strip = convolve([torch.cat([h, t.narrow(dim, 0, span)], dim=dim) for h, t in zip(heads, tensors)])
            result.narrow(dim, 0, halo.top).copy_(strip)
        if below and halo.bottom:  # output rows [rows - bottom, rows)
            strip = convolve(
                [torch.cat([t.narrow(dim, rows - span, span), b], dim=dim) for t, b in zip(tensors, tails)]
            )
            result.narrow(dim, result.shape[dim] - halo.bottom, halo.bottom).copy_(strip)
        return output

    halo.handles.append(module.register_forward_pre_hook(start, with_kwargs=True))
    halo.handles.append(module.register_forward_hook(finish, with_kwargs=True))


def _first(output: Tensor | tuple) -> Tensor:
    """The output tensor of a convolution's forward that returns ``(output, cache)`` (CogVideoX's), or the output."""
    return output[0] if isinstance(output, tuple) else output


def _slots(args: list, kwargs: dict) -> list[tuple[list | dict, int | str]]:
    """Where the tensor arguments are: (container, index or key), positional ones first."""
    return [(args, i) for i, a in enumerate(args) if isinstance(a, Tensor)] + [
        (kwargs, k) for k, a in kwargs.items() if isinstance(a, Tensor)
    ]


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    return [a for a in args if isinstance(a, Tensor)] + [a for a in kwargs.values() if isinstance(a, Tensor)]
