"""The plan's tensor-parallel styles as torch ``ParallelStyle``s (``torch.distributed.tensor.parallel``).

``"colwise"`` and ``"rowwise"`` are torch's ``ColwiseParallel`` / ``RowwiseParallel``; ``"colwise_gather"`` is
``ColwiseParallel(output_layouts=Replicate())``. Fused projections (``Packed``) need each part split on its own:
``PackedColwiseParallel`` / ``PackedRowwiseParallel`` keep torch's input and output handling and only choose which
rows (columns) a rank keeps. ``"sharded_norm"`` is ``norms.ShardedNorm``.

Every style is applied with ``src_data_rank=None``: each rank cuts its shard from its own copy of the weights (the
ranks of a model-parallel group hold the same weights, as for FSDP), so applying moves no data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from lightning_dit_parallel.parallel.tensor.norms import ShardedNorm
from lightning_dit_parallel.plan import Packed

#: A resolved style of one module: a plan style name or ``Packed`` with absolute part sizes.
Spec = str | Packed


def packed_sizes(spec: Packed, module: nn.Module, path: str) -> tuple[int, ...]:
    """Absolute sizes of the parts of a packed Linear's split dim (output features for colwise, input for rowwise).

    Raises:
        ValueError: when the parts are not given and the Linear carries no ``_tp_packed_*_blocks``, or they do not
            divide the features.
    """
    features = module.out_features if spec.style == "colwise" else module.in_features
    attr = "_tp_packed_col_blocks" if spec.style == "colwise" else "_tp_packed_row_blocks"
    blocks = spec.blocks if spec.blocks is not None else getattr(module, attr, None)
    if not blocks:
        raise ValueError(f"{path}: Packed({spec.style!r}) without blocks needs the Linear's {attr} attribute.")
    total = sum(blocks)
    if features % total:
        raise ValueError(f"{path}: Packed parts {list(blocks)} (sum {total}) do not divide its {features} features.")
    return tuple(b * (features // total) for b in blocks)


def _pack(param: torch.Tensor, dim: int, sizes: tuple[int, ...], mesh: DeviceMesh) -> DTensor:
    """This rank's rows (dim 0) or columns (dim 1) of every part, concatenated: part b of size n_b gives its
    slice ``[r * n_b/N, (r+1) * n_b/N)``. Labelled ``Shard(dim)`` so that the Linear computes locally; the
    DTensor's global view is then the ranks' shards in rank order, which ``unpack`` puts back in part order."""
    rank, n = mesh.get_local_rank(), mesh.size()
    parts, offset = [], 0
    for size in sizes:
        parts.append(param.detach().narrow(dim, offset + rank * (size // n), size // n))
        offset += size
    local = torch.cat(parts, dim=dim).contiguous()  # (sum n_b/N, in) or (out, sum n_b/N)
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)


def unpack(full: torch.Tensor, dim: int, sizes: tuple[int, ...], n: int) -> torch.Tensor:
    """Invert ``_pack``: the ranks' shards in rank order (what ``full_tensor()`` gives) -> the parts in model order.

    (N chunks of [n_0/N, n_1/N, ...]) along ``dim`` -> [n_0, n_1, ...] along ``dim``.
    """
    chunks = [c.split([s // n for s in sizes], dim=dim) for c in full.chunk(n, dim=dim)]  # chunks[rank][part]
    return torch.cat([chunks[r][b] for b in range(len(sizes)) for r in range(n)], dim=dim)


class PackedColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for a fused Linear whose output features are several parts (e.g. q, k, v)."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes = sizes

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for param_name, param in module.named_parameters():  # weight (out, in) and bias (out,): rows of every part
            packed = _pack(param, 0, self.sizes, device_mesh)
            module.register_parameter(param_name, nn.Parameter(packed, requires_grad=param.requires_grad))


class PackedRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for a Linear whose input features are several column-split parts one after another."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes = sizes

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        weight = _pack(module.weight, 1, self.sizes, device_mesh)  # (out, in) -> (out, sum n_b/N)
        module.register_parameter("weight", nn.Parameter(weight, requires_grad=module.weight.requires_grad))
        if module.bias is not None:  # added once, after the all-reduce
            bias = DTensor.from_local(module.bias.detach(), device_mesh, [Replicate()], run_check=False)
            module.register_parameter("bias", nn.Parameter(bias, requires_grad=module.bias.requires_grad))


def torch_style(spec: Spec, module: nn.Module, path: str) -> ParallelStyle:
    """The torch ``ParallelStyle`` that applies ``spec`` to ``module`` (sizes of packed parts read from it)."""
    if isinstance(spec, Packed):
        sizes = packed_sizes(spec, module, path)
        return PackedColwiseParallel(sizes) if spec.style == "colwise" else PackedRowwiseParallel(sizes)
    if spec == "colwise":
        return ColwiseParallel()
    if spec == "rowwise":
        return RowwiseParallel()
    if spec == "colwise_gather":
        return ColwiseParallel(output_layouts=Replicate())  # (B, k*hidden/N) -> all-gather -> (B, k*hidden)
    if spec == "sharded_norm":
        return ShardedNorm()
    raise ValueError(f"{path}: unknown tensor-parallel style {spec!r}.")


def split_dim(spec: Spec) -> int | None:
    """The weight dim a style splits: 0 (output features) for colwise styles and norms, 1 for rowwise."""
    style = spec.style if isinstance(spec, Packed) else spec
    return 1 if style == "rowwise" else 0
