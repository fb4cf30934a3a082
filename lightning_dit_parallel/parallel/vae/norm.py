"""Group normalisation over bands: the statistics of each (sample, group) are those of the whole image.

``F.group_norm`` normalises each group of channels of a sample over all its positions. A band holds some rows
of them; the statistics must cover every band's rows, exactly. Each band takes, per (sample, group), its count
``n_i``, mean ``m_i`` and centred sum of squares ``M2_i`` from torch's own group-norm kernel
(``torch.native_group_norm``, which also normalises the band with them); one all-gather of these ``(3, B, G)``
numbers, combined in float64 in band order, gives on every rank the whole image's sum ``sum_i n_i m_i`` and centred
sum of squares ``sum_i M2_i + n_i (m_i - m)^2`` over the count ``sum_i n_i`` (the parallel variance of Chan et al.):
the sums and counts of all rows, never an average of the bands' means. The band's output, normalised with its own
statistics, is then rescaled in place to the image's: ``(x - m_i) r_i -> (x - m) r w + b`` is
``y * (r / r_i) w + ((m_i - m) r w + b)``; no tensor of the input's size is made besides the output, as in one process.

Half-precision inputs: the statistics come from float32 copies of a few groups at a time (the kernel would return
them in half precision), and the output is computed from them group by group in float32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dit_parallel.parallel.vae.bands import BandGroup

#: Groups normalised at once on the half-precision path (bounds its float32 copies).
_HALF_PRECISION_GROUPS = 4


def band_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, band: BandGroup
) -> Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` of the image whose bands the group's ranks hold.

    Args:
        x: (B, C, *positions) this band's part of the tensor (a collective: every rank of ``band`` calls it).
        num_groups, weight, bias, eps: as for ``F.group_norm``.
        band: the ranks holding the other bands.

    Returns:
        (B, C, *positions), this band's rows of the group normalisation of the whole image.
    """
    b, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups.")
    positions = x.numel() // max(b * c, 1)
    count = positions * (c // num_groups)  # elements of one (sample, group) in this band
    x = x.contiguous(memory_format=_kernel_format(x))  # what F.group_norm gives its kernel (a copy only if needed)
    full_precision = x.dtype in (torch.float32, torch.float64)
    if full_precision:
        # (B, C, *positions) normalised with this band's statistics; mean, rstd: (B, G)
        out, mean, rstd = torch.native_group_norm(x, None, None, b, c, positions, num_groups, eps)
    else:
        out = None
        mean, rstd = _float32_moments(x, num_groups, eps)
    mean_all, rstd_all = _image_moments(mean, rstd, count, eps, band)  # (B, G) float64 each
    per_channel = c // num_groups
    to_channels = lambda t: t.repeat_interleave(per_channel, dim=1)  # noqa: E731 -- (B, G) -> (B, C)
    w = weight.to(torch.float64) if weight is not None else torch.ones(c, dtype=torch.float64, device=x.device)
    view = (b, c) + (1,) * (x.dim() - 2)  # (B, C) -> (B, C, 1, ...): broadcast over the positions
    if full_precision:
        scale = to_channels(rstd_all / rstd.to(torch.float64)) * w  # (B, C)
        shift = to_channels((mean.to(torch.float64) - mean_all) * rstd_all) * w  # (B, C)
        if bias is not None:
            shift = shift + bias.to(torch.float64)
        shift, scale = shift.to(x.dtype).view(view), scale.to(x.dtype).view(view)
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
            return torch.addcmul(shift, out, scale)  # autograd records no out= variant
        return torch.addcmul(shift, out, scale, out=out)  # in place: y * scale + shift, y = (x - m_i) r_i
    scale = to_channels(rstd_all) * w  # (B, C): x * scale + shift = (x - m) r w + b
    shift = -to_channels(mean_all) * scale
    if bias is not None:
        shift = shift + bias.to(torch.float64)
    out = torch.empty_like(x)  # x is in the kernel's format already
    step = per_channel * _HALF_PRECISION_GROUPS
    for start in range(0, c, step):  # float32 arithmetic, a few groups at a time
        part = slice(start, min(start + step, c))
        shape = (b, part.stop - start) + (1,) * (x.dim() - 2)  # (B, channels of the part, 1, ...)
        out[:, part] = torch.addcmul(
            shift[:, part].float().view(shape), x[:, part].float(), scale[:, part].float().view(shape)
        ).to(x.dtype)
    return out


def _kernel_format(x: Tensor) -> torch.memory_format:
    """The memory format ``F.group_norm`` makes its input and output: on CPU the input's suggested format, on CUDA
    contiguous. The next convolution then gets the layout (and runs the algorithm, with its rounding) it gets in one
    process."""
    if x.device.type != "cpu":
        return torch.contiguous_format
    try:
        from torch._prims_common import suggest_memory_format
    except ImportError:  # a private helper of torch; without it, contiguous
        return torch.contiguous_format
    return suggest_memory_format(x)


def _float32_moments(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """This band's mean and rstd per (sample, group), in float32, from float32 copies of a few groups at a time."""
    b, c = x.shape[:2]
    per_channel = c // num_groups
    positions = x.numel() // max(b * c, 1)
    means, rstds = [], []
    for start in range(0, num_groups, _HALF_PRECISION_GROUPS):
        groups = min(_HALF_PRECISION_GROUPS, num_groups - start)
        part = x[:, start * per_channel : (start + groups) * per_channel].float()  # (B, groups * C/G, *positions)
        _, mean, rstd = torch.native_group_norm(part, None, None, b, groups * per_channel, positions, groups, eps)
        means.append(mean)
        rstds.append(rstd)
    return torch.cat(means, dim=1), torch.cat(rstds, dim=1)  # (B, G) each


def _image_moments(mean: Tensor, rstd: Tensor, count: int, eps: float, band: BandGroup) -> tuple[Tensor, Tensor]:
    """The whole image's mean and rstd per (sample, group) from every band's count, mean and rstd (float64).

    One all-gather of (3, B, G) float64 per call.
    """
    mean64, rstd64 = mean.to(torch.float64), rstd.to(torch.float64)
    m2 = count * (rstd64.pow(-2) - eps)  # (B, G): centred sum of squares of this band, n_i * var_i
    local = torch.stack([torch.full_like(mean64, count), mean64, m2])  # (3, B, G): n, m, M2
    parts = [torch.empty_like(local) for _ in range(band.size)]
    dist.all_gather(parts, local, group=band.group)  # (3, B, G) from every band
    n, m, m2 = torch.stack(parts).unbind(1)  # (N, 3, B, G) -> 3 x (N, B, G)
    total = n.sum(0)  # (B, G): every position of the image
    mean_all = (n * m).sum(0) / total  # (B, G): the sum of all rows over their count
    var_all = (m2 + n * (m - mean_all).square()).sum(0) / total  # (B, G): centred sum of squares over the count
    return mean_all, torch.rsqrt(var_all + eps)
