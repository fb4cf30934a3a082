"""A parameter kept as this rank's rows: a DTensor ``Shard(0)`` over a 1-D mesh with torch's chunk sizes
(``ceil(n / N)`` rows per rank, the last ranks fewer or none), which lean loading reads alone from the files
(``loading.deferred``).

For weights that a parallelizer keeps by rows outside FSDP: a pipeline stage's rows of the DiT's weights outside its
blocks (``pipeline/root_shards.py``) and a sharded encoder's token table (``fsdp/vocab_rows.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lightning_dit_parallel.loading.deferred import deferred_roots


def row_counts(rows: int, ranks: int) -> list[int]:
    """Rows each of ``ranks`` holds of a dim of ``rows``, as FSDP2 and DTensor ``Shard(0)`` cut it: ``torch.chunk``'s
    sizes, then zeros for the ranks past the last piece (e.g. 5 rows on 4 ranks: ``[2, 2, 1, 0]``)."""
    per = -(-rows // ranks)
    return [max(0, min(per, rows - r * per)) for r in range(ranks)]


def row_range(rows: int, mesh: DeviceMesh) -> tuple[int, int]:
    """``(start, stop)`` of this rank's rows of a dim 0 of ``rows`` (``row_counts``)."""
    counts = row_counts(rows, mesh.size())
    start = sum(counts[: mesh.get_local_rank()])
    return start, start + counts[mesh.get_local_rank()]


@torch.no_grad()
def own_rows(param: Tensor, mesh: DeviceMesh, requires_grad: bool = False) -> nn.Parameter:
    """``param`` (whole, or a meta tensor before lean loading) as this rank's rows of it: a parameter holding a
    DTensor ``Shard(0)`` with storage of its own (the whole tensor is not kept)."""
    start, stop = row_range(param.shape[0], mesh)
    # (rows, ...) -> this rank's (stop - start, ...)
    local = torch.empty((stop - start, *param.shape[1:]), dtype=param.dtype, device=param.device)
    if not param.is_meta:
        local.copy_(param[start:stop])
    stride = torch.empty(param.shape, device="meta").stride()
    tensor = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=param.shape, stride=stride)
    return nn.Parameter(tensor, requires_grad=requires_grad)


def is_lean(module: nn.Module) -> bool:
    """Whether ``module``'s weights are read from its files at each setup (lean loading): then a parallelizer's
    teardown puts its parameters back on the meta device instead of gathering them."""
    return any(path == "" for path, _, _ in deferred_roots(module))
