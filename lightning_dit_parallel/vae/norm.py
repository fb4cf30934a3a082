"""Group normalisation over bands: the statistics of each (sample, group) are those of the whole image.

``F.group_norm`` normalises each group of channels of a sample over all its positions. A band holds some rows
of them; the statistics must cover every band's rows, exactly. Each band computes, per (sample, group), its count
``n_i``, mean ``m_i`` and centred sum of squares ``M2_i`` (``torch.var_mean``: numerically stable, no temporary of
the input's size); one all-gather of these ``(3, B, G)`` numbers, combined in float64 in band order, gives on every
rank the whole image's sum ``sum_i n_i m_i`` and centred sum of squares ``sum_i M2_i + n_i (m_i - m)^2`` over the
count ``sum_i n_i`` (the parallel variance of Chan et al.): the sums and counts of all rows, never an average of
the bands' means. Each band then normalises its rows with them, in one fused ``x * scale + shift``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dit_parallel.vae.bands import BandGroup


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
    grouped = x.reshape(b, num_groups, -1)  # (B, C, *positions) -> (B, G, C/G * positions)
    stats_input = grouped if grouped.dtype in (torch.float32, torch.float64) else grouped.float()
    var, mean = torch.var_mean(stats_input, dim=-1, correction=0)  # (B, G) each
    count = grouped.shape[-1]
    local = torch.stack([torch.full_like(mean, count), mean, var * count]).to(torch.float64)  # (3, B, G): n, m, M2
    parts = [torch.empty_like(local) for _ in range(band.size)]
    dist.all_gather(parts, local, group=band.group)  # (3, B, G) from every band
    n, m, m2 = torch.stack(parts).unbind(1)  # (N, 3, B, G) -> 3 x (N, B, G)
    total = n.sum(0)  # (B, G): every position of the image
    mean_all = (n * m).sum(0) / total  # (B, G): the sum of all rows over their count
    var_all = (m2 + n * (m - mean_all).square()).sum(0) / total  # (B, G): centred sum of squares over the count
    rstd = torch.rsqrt(var_all + eps)  # (B, G)
    per_channel = c // num_groups
    scale = rstd.repeat_interleave(per_channel, dim=1)  # (B, G) -> (B, C)
    shift = -mean_all.repeat_interleave(per_channel, dim=1) * scale  # (B, C)
    if weight is not None:
        scale = scale * weight.to(torch.float64)
        shift = shift * weight.to(torch.float64)
    if bias is not None:
        shift = shift + bias.to(torch.float64)
    view = (b, c) + (1,) * (x.dim() - 2)  # (B, C) -> (B, C, 1, ...): broadcast over the positions
    out = torch.empty_like(x, memory_format=_output_format(x))
    return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view), out=out)  # x * scale + shift


def _output_format(x: Tensor) -> torch.memory_format:
    """The memory format ``F.group_norm`` gives its output (on CPU the input's suggested format, on CUDA contiguous),
    so that the next convolution runs the algorithm it runs in one process (a channels-last input picks another one,
    with other rounding)."""
    if x.device.type != "cpu":
        return torch.contiguous_format
    try:
        from torch._prims_common import suggest_memory_format
    except ImportError:  # private helper of torch; without it, contiguous
        return torch.contiguous_format
    return suggest_memory_format(x)
