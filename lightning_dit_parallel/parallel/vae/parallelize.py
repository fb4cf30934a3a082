"""``apply_parallel_vae``: decode a VAE's latents in bands along the height over the ranks of a group, exactly.

Hooks on the VAE's decoder (its forward is not copied):

* the decoder's forward pre-hook cuts its first argument (the latent) into ``N`` bands of rows (uneven heights:
  the first bands take one row more) and keeps this rank's band (tensor arguments the cut declares ``replicated``
  pass whole); while the decoder runs, ``F.group_norm`` reduces its statistics over the bands (``norm.py``),
  ``F.interpolate`` is checked to be a nearest upsampling by an integer factor (by a power of two when given as a
  size: a band's rows then map to the rows of the upsampled band, so the bands stay aligned), ``F.batch_norm`` to use
  running statistics, and ``F.scaled_dot_product_attention`` is refused outside the declared attention modules;
* every convolution of the decoder gets the halo rows it needs from the neighbouring bands (point-to-point, in flight
  while it runs on the band; the band's boundary rows are then recomputed with them, ``conv.py``);
* every declared attention module attends over the keys and values of all bands (``attention.py``), every declared
  linear attention sums over all bands' tokens (``linear_attention.py``), every declared noise-drawing module draws
  the whole noise map and keeps its rows (``noise.py``);
* the decoder's forward hook gathers the decoded bands (the first element of a returned tuple; the caches after it
  stay with the band), so every rank returns the whole decoded image.

Everything outside the decoder (``post_quant_conv``, the VAE's frame loop and caches, clamping, unpatchify, the
encoder) runs as before; the encoder is not banded.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn.modules.conv import _ConvNd
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.vae.attention import band_attention
from lightning_dit_parallel.parallel.vae.bands import BandGroup, Bands, band_rows
from lightning_dit_parallel.parallel.vae.comm import gather_bands
from lightning_dit_parallel.parallel.vae.conv import ConvHalo, conv_halo, install_halo
from lightning_dit_parallel.parallel.vae.linear_attention import BandLinearAttention
from lightning_dit_parallel.parallel.vae.noise import band_noise, check_same_random_state
from lightning_dit_parallel.parallel.vae.norm import band_group_norm
from lightning_dit_parallel.plan import VaeCut
from lightning_dit_parallel.utils.hooks import remove_handles

#: The functions the decoder's forward sees replaced, captured at import (the replacements call these).
_FUNCTIONS = ("group_norm", "interpolate", "scaled_dot_product_attention", "batch_norm")
_ORIGINAL: dict[str, Callable] = {name: getattr(F, name) for name in _FUNCTIONS}
_RANDN = torch.randn

#: Interpolation modes that map a band's rows to the rows of the upsampled band (with an integer factor).
_NEAREST = ("nearest", "nearest-exact")

#: Layers whose statistics or inputs span the height in a way the bands cannot reproduce.
_UNSUPPORTED_LAYERS = ("SpatialNorm", "SpatialNorm3D", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


@dataclass
class ParallelVae:
    """What ``apply_parallel_vae`` installed on one VAE; ``remove()`` takes it off.

    Attributes:
        vae: the VAE.
        decoder: its banded decoder.
        band: the ranks decoding together.
        bands: the cut of the decoder call in progress (``None`` between calls).
        halos: the convolutions that exchange halo rows.
        calls: decoder calls decoded in bands so far (for tests and logs).
    """

    vae: nn.Module
    decoder: nn.Module
    band: BandGroup
    cut: VaeCut
    bands: Bands | None = None
    halos: list[ConvHalo] = field(default_factory=list)
    linear: list[BandLinearAttention] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)
    calls: int = 0
    _saved: list[dict[str, Callable]] = field(default_factory=list)

    def remove(self) -> None:
        remove_handles(self.handles)
        for halo in self.halos:
            halo.remove()
        self.halos.clear()
        for attention in self.linear:
            attention.remove()
        self.linear.clear()

    def current(self, where: str) -> Bands:
        if self.bands is None:
            raise RuntimeError(f"{where} ran outside the banded decoder's forward.")
        return self.bands

    # -- the decoder's hooks ------------------------------------------------------------------------------

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = self._signature.bind(*args, **kwargs)
        names = list(bound.arguments)
        latent = bound.arguments[names[0]]
        if not isinstance(latent, Tensor):
            raise ValueError(
                f"{self._where}: the first argument must be the latent tensor, got {type(latent).__name__}."
            )
        others = [n for n in names[1:] if isinstance(bound.arguments[n], Tensor) and n not in self.cut.replicated]
        if others:
            raise ValueError(
                f"{self._where}: the parallel VAE decode cuts only the latent; the tensor argument(s) {others} would"
                " not be cut to the band (e.g. a spatially conditioned norm). Arguments without a height (a timestep)"
                f" are declared in VaeCut.replicated (declared: {list(self.cut.replicated)})."
            )
        dim = self.cut.height_dim
        rows = band_rows(latent.shape[dim], self.band.size)  # ValueError on every rank for a latent too short
        self.bands = Bands(rows, self.band.rank, dim)
        if self.cut.noise:  # its noise maps come from the global random state: the same on every rank?
            check_same_random_state(latent.device, self.band, self._where)
        # (..., H, W) -> (..., rows, W): this rank's band of the latent, dense (as the whole latent is in one process)
        band = latent.narrow(dim, self.bands.start, rows[self.band.rank])
        bound.arguments[names[0]] = band.clone(memory_format=torch.preserve_format)
        self._saved.append({name: getattr(F, name) for name in _FUNCTIONS})
        F.group_norm = self._group_norm
        F.interpolate = self._interpolate
        F.scaled_dot_product_attention = self._refuse_attention
        F.batch_norm = self._batch_norm
        return bound.args, bound.kwargs

    def _gather(self, module: nn.Module, args: tuple, output: Any) -> Tensor | tuple:
        decoded = output[0] if isinstance(output, tuple) and output else output
        if not isinstance(decoded, Tensor):
            raise ValueError(
                f"{self._where} returned {type(output).__name__}; the parallel VAE decode gathers a tensor (or the"
                " first element of a tuple)."
            )
        bands = self.current(self._where)
        rows = bands.rows_at(decoded.shape[bands.dim], self._where)
        self.calls += 1
        whole = gather_bands(decoded, bands.dim, rows, self.band)  # (..., rows_band * s, W') -> (..., H * s, W')
        return (whole, *output[1:]) if isinstance(output, tuple) else whole  # caches stay with the band

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._saved:  # empty when the pre-hook raised before replacing anything
            for name, fn in self._saved.pop().items():
                setattr(F, name, fn)
        self.bands = None
        for halo in self.halos:  # transfers of a convolution whose forward raised are not waited for
            halo.pending = None

    # -- what the decoder's forward sees --------------------------------------------------------------------

    def _group_norm(self, x: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
        return band_group_norm(x, num_groups, weight, bias, eps, self.band)

    def _interpolate(self, x: Tensor, size=None, scale_factor=None, mode: str = "nearest", *args, **kwargs) -> Tensor:
        axis = x.dim() - 2 + self.cut.height_dim  # index of the height among the spatial dims
        if size is not None:  # a size: the output row i reads input row floor(i * (in / out)), exact for 2^k
            rows = size[axis] if isinstance(size, (tuple, list, torch.Size)) else size
            factor, rest = divmod(int(rows), x.shape[self.cut.height_dim])
            aligned = scale_factor is None and not rest and factor >= 1 and factor & (factor - 1) == 0
        else:
            factor = scale_factor[axis] if isinstance(scale_factor, (tuple, list)) else scale_factor
            aligned = factor is not None and float(factor) == int(factor)
        if mode not in _NEAREST or not aligned:
            raise ValueError(
                f"{self._where}: the parallel VAE decode needs every interpolation inside the decoder to be a nearest"
                " upsampling by an integer factor along the height (by a power of two when given as a size; bands"
                f" stay aligned); got size={size}, scale_factor={scale_factor}, mode={mode!r} for"
                f" {x.shape[self.cut.height_dim]} rows."
            )
        return _ORIGINAL["interpolate"](x, size, scale_factor, mode, *args, **kwargs)

    def _batch_norm(
        self, x: Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False, *args, **kwargs
    ) -> Tensor:
        if training:
            raise ValueError(
                f"{self._where}: a batch norm in training mode (batch statistics) inside the banded decoder; call"
                " vae.eval() (running statistics are per channel and exact on every band)."
            )
        return _ORIGINAL["batch_norm"](x, running_mean, running_var, weight, bias, training, *args, **kwargs)

    def _refuse_attention(self, *args, **kwargs) -> Tensor:
        raise ValueError(
            f"{self._where}: an attention module that the VAE's cut does not declare (declared:"
            f" {list(self.cut.attention)}) called F.scaled_dot_product_attention; it would attend within one band"
            " only. Add its class name to VaeCut.attention."
        )

    @property
    def _where(self) -> str:
        return f"{type(self.vae).__name__}.{self.cut.decoder}"

    @functools.cached_property
    def _signature(self) -> inspect.Signature:
        return inspect.signature(self.decoder.forward)


def apply_parallel_vae(vae: nn.Module, cut: VaeCut, group: ProcessGroup) -> ParallelVae:
    """Decode ``vae``'s latents in bands over the ranks of ``group``; every rank gets the whole decoded output.

    Every rank of ``group`` must decode the same latents at the same time (the ranks of a model-parallel group run
    the same ``predict_step``). Installation communicates nothing.

    Args:
        vae: a VAE whose class has ``cut`` (see ``find_vaes``).
        cut: how it is cut.
        group: the ranks that decode together, in band order (a data-parallel group's model-parallel ranks).

    Raises:
        ValueError: for a decoder layer the bands cannot reproduce exactly (a strided, transposed or non-zero-padded
            convolution along the height, a spatially conditioned or instance norm, an upsampling other than nearest),
            before anything is installed.
    """
    try:
        decoder = vae.get_submodule(cut.decoder)
    except AttributeError as exc:
        raise ValueError(f"{type(vae).__name__} has no decoder submodule {cut.decoder!r} (VaeCut.decoder).") from exc
    found = _inspect(decoder, cut)  # pure: raises before anything is installed
    parallel = ParallelVae(vae, decoder, BandGroup.of(group), cut)
    for module, halo in found.halos:
        parallel.halos.append(halo)
        install_halo(module, halo, cut.height_dim, parallel.band, lambda: parallel.bands)
    for where, module in found.attention:  # inside the decoder's replacement, each declared module: the banded kernel
        kernel = band_attention(
            _ORIGINAL["scaled_dot_product_attention"], parallel.band, parallel.current, where, cut.attention_masks
        )
        parallel.handles.extend(_replace_during_forward(module, F, "scaled_dot_product_attention", kernel))
    for where, module in found.linear:
        parallel.linear.append(
            BandLinearAttention(module, where, parallel.band, lambda: parallel.bands, cut.height_dim)
        )
    for where, module in found.noise:
        noise = band_noise(_RANDN, parallel.current, where)
        parallel.handles.extend(_replace_during_forward(module, torch, "randn", noise))
    parallel.handles.append(decoder.register_forward_pre_hook(parallel._enter, with_kwargs=True))
    parallel.handles.append(decoder.register_forward_hook(parallel._gather))
    parallel.handles.append(decoder.register_forward_hook(parallel._leave, always_call=True))
    return parallel


@dataclass
class _Found:
    """What ``_inspect`` found in a decoder: (module, halo) of every convolution with one, (path, module) of the
    declared attention, linear attention and noise-drawing modules."""

    halos: list[tuple[nn.Module, ConvHalo]] = field(default_factory=list)
    attention: list[tuple[str, nn.Module]] = field(default_factory=list)
    linear: list[tuple[str, nn.Module]] = field(default_factory=list)
    noise: list[tuple[str, nn.Module]] = field(default_factory=list)


def _inspect(decoder: nn.Module, cut: VaeCut) -> _Found:
    """The decoder's convolutions with a halo and its declared modules; checks every layer.

    Raises:
        ValueError: naming the first layer that the bands cannot reproduce exactly.
    """
    found = _Found()
    inner: set[int] = set()  # convolutions banded at the wrapper that pads for them
    for path, module in decoder.named_modules():
        name = type(module).__name__
        where = f"{cut.decoder}.{path}" if path else cut.decoder
        if name in _UNSUPPORTED_LAYERS:
            raise ValueError(
                f"The parallel VAE decode cannot band {where} ({name}): its statistics or inputs span the height."
            )
        if isinstance(module, nn.Upsample) and (module.mode not in _NEAREST or module.size is not None):
            raise ValueError(
                f"The parallel VAE decode cannot band {where} ({name}): mode={module.mode!r}, size={module.size};"
                " only a nearest upsampling by a scale factor keeps the bands aligned."
            )
        attribute = _padding_attribute(module, cut)
        if isinstance(module, _ConvNd) and id(module) not in inner:
            halo = conv_halo(module, where, cut.height_dim, attribute)
            if halo is not None:
                found.halos.append((module, halo))
        elif attribute is not None and not isinstance(module, _ConvNd):
            conv = _wrapped_conv(module, where, cut.height_dim)
            if conv is not None:  # the wrapper pads the height with F.pad: banded at the wrapper
                inner.add(id(conv))
                halo = conv_halo(conv, where, cut.height_dim, attribute, holder=module)
                if halo is not None:
                    found.halos.append((module, halo))
        for names, into in (
            (cut.attention, found.attention),
            (cut.linear_attention, found.linear),
            (cut.noise, found.noise),
        ):
            if name in names:
                into.append((where, module))
    return found


def _wrapped_conv(wrapper: nn.Module, where: str, height_dim: int) -> _ConvNd | None:
    """The one convolution child of a wrapper declared in ``VaeCut.padding_attributes``, when the wrapper pads the
    height for it (the child has a kernel taller than one row and no padding along the height); ``None`` when the
    child pads the height itself (it is banded as any convolution) or needs no halo.

    Raises:
        ValueError: for a wrapper without exactly one convolution child.
    """
    convs = [child for child in wrapper.children() if isinstance(child, _ConvNd)]
    if len(convs) != 1:
        raise ValueError(
            f"The parallel VAE decode cannot band {where} ({type(wrapper).__name__}): VaeCut.padding_attributes names"
            f" it, but it has {len(convs)} convolution children (a wrapper needs exactly one)."
        )
    conv = convs[0]
    axis = len(conv.kernel_size) + height_dim
    if axis < 0 or conv.kernel_size[axis] == 1:
        return None
    padding = conv.padding
    if isinstance(padding, str):
        return conv if padding == "valid" else None
    return conv if padding[axis] == 0 else None


def _padding_attribute(module: nn.Module, cut: VaeCut) -> str | None:
    for klass in type(module).__mro__:
        if klass.__name__ in cut.padding_attributes:
            return cut.padding_attributes[klass.__name__]
    return None


def _replace_during_forward(module: nn.Module, namespace: Any, name: str, fn: Callable) -> list[RemovableHandle]:
    """Hooks that make ``namespace.<name>`` (``F.scaled_dot_product_attention``, ``torch.randn``) be ``fn`` for the
    duration of ``module``'s forward (put back even on errors)."""
    saved: list[Callable] = []

    def enter(module: nn.Module, args: tuple) -> None:
        saved.append(getattr(namespace, name))
        setattr(namespace, name, fn)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        if saved:
            setattr(namespace, name, saved.pop())

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
