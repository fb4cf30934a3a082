"""Single-tensor collectives under their current torch names, with the older names where torch predates them.

Looked up at each call (not bound at import), so a counter that wraps ``torch.distributed``'s functions
(``testing.comm_counter``) sees these calls too.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def all_gather_single(output: Tensor, input: Tensor, group: ProcessGroup | None = None, async_op: bool = False):
    """Every rank's ``input`` one after another along dim 0 into ``output``: (X, ...) per rank -> (N * X, ...)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: Tensor, input: Tensor, group: ProcessGroup | None = None, async_op: bool = False):
    """The sum over ranks of ``input``, rank ``i`` receiving block ``i`` of dim 0: (N * X, ...) -> (X, ...)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, input, group=group, async_op=async_op)
