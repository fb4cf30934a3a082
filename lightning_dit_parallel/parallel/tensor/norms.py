"""``ShardedNorm``: a normalisation over features that tensor parallelism has split across the tp ranks.

Some attention modules normalise queries and keys over all heads at once (Wan's ``norm_q = RMSNorm(heads *
head_dim)``, diffusers' ``qk_norm="rms_norm_across_heads"``). After the column-wise projection a rank holds only
its heads' features, so a local norm would use the wrong statistics. ``ShardedNorm`` splits the norm's affine
parameters like the features (``Shard(0)`` DTensors) and computes the statistics over all ranks: each rank sums over
its features and the sums are all-reduced over the tp group (``Partial`` -> ``Replicate``), ``B * S`` floats per
statistic, far less than gathering the features. RMS norms (``torch.nn.RMSNorm``, diffusers' ``RMSNorm``) need one
all-reduce, layer norms (``torch.nn.LayerNorm`` and subclasses) two (mean, then the centred second moment).

The norm's ``forward`` is replaced by an instance attribute while tensor parallelism is applied; removing it (see
``tensor/parallelize.py``) restores the module's own.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


def norm_kind(module: nn.Module) -> str | None:
    """``"rms"`` or ``"layer"`` for the normalisations ``ShardedNorm`` supports, else ``None``."""
    from diffusers.models.normalization import RMSNorm

    if isinstance(module, nn.LayerNorm):
        return "layer"
    if isinstance(module, (nn.RMSNorm, RMSNorm)):
        return "rms"
    return None


def norm_features(module: nn.Module) -> int | None:
    """The number of features a normalisation normalises over (its last dim), or ``None`` when unknown."""
    shape = getattr(module, "normalized_shape", None) or getattr(module, "dim", None)
    if isinstance(shape, int):
        return shape
    if shape is not None and len(shape) == 1:
        return int(shape[0])
    weight = getattr(module, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, Tensor) and weight.ndim == 1 else None


def _all_reduce(local_sum: Tensor, mesh: DeviceMesh) -> Tensor:
    """Sum of every rank's ``local_sum`` (a collective over the tp group): (..., 1) partial -> (..., 1)."""
    return DTensor.from_local(local_sum, mesh, [Partial()], run_check=False).full_tensor()


def _sharded_forward(module: nn.Module, kind: str, mesh: DeviceMesh, x: Tensor) -> Tensor:
    """The norm of ``x`` (..., D/N), this rank's features, with statistics over all D features."""
    features = x.shape[-1] * mesh.size()
    xf = x.to(torch.float32)
    if kind == "layer":
        mean = _all_reduce(xf.sum(-1, keepdim=True), mesh) / features  # (..., 1)
        xf = xf - mean
    variance = _all_reduce(xf.pow(2).sum(-1, keepdim=True), mesh) / features  # (..., 1)
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps  # torch.nn.RMSNorm(eps=None)
    y = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        y = y * _local(weight).to(y.dtype)
    if bias is not None:
        y = y + _local(bias).to(y.dtype)
    return y


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ShardedNorm(ParallelStyle):
    """Tensor-parallel style for a norm over split features: parameters ``Shard(0)``, statistics all-reduced."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        kind = norm_kind(module)
        if kind is None:
            raise ValueError(
                f"{type(module).__name__} normalises features that tensor parallelism splits; only RMSNorm and"
                " LayerNorm can compute their statistics over the tp ranks."
            )
        for name, param in list(module.named_parameters(recurse=False)):  # (D,) -> (D/N,) this rank's features
            shard = distribute_tensor(param.detach(), device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
        module.forward = partial(_sharded_forward, module, kind, device_mesh)
        return module
