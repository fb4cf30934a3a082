"""Communication helpers for sequence parallelism, kept apart from the attention math.

Every function takes the process group explicitly. ``None`` as a group means "this axis has size 1":
the helpers then return their input without communicating.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


class PendingAllToAll:
    """A non-blocking ``all_to_all_dim0`` in flight; ``wait()`` returns what was received.

    ``x``: (N, ...) with N the group size; ``x[i]`` goes to rank ``i``, and after ``wait()`` row ``i`` of the
    result came from rank ``i``. With a group of size 1 nothing is sent and ``wait()`` returns ``x``.
    """

    def __init__(self, x: Tensor, group: ProcessGroup | None) -> None:
        n = group_size(group)
        if n > 1 and x.shape[0] != n:
            raise ValueError(f"all-to-all needs dim 0 of size {n} (the group size); got shape {tuple(x.shape)}.")
        self._work = None
        self._out = x
        if n > 1:
            x = x.contiguous()
            self._out = torch.empty_like(x)
            self._work = dist.all_to_all_single(self._out, x, group=group, async_op=True)

    def wait(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._out


def all_gather_dim(x: Tensor, dim: int, group: ProcessGroup | None) -> Tensor:
    """Concatenate ``x`` from every rank of ``group`` along ``dim``, in rank order.

    (..., S, ...) -> (..., N*S, ...).
    """
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


class RingExchange:
    """Pass a tensor one step around the ring of ``group``: send to rank+1, receive from rank-1.

    ``start`` posts the non-blocking send and receive so the caller can compute while they travel;
    ``wait`` returns the received tensor.
    """

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (rank + 1) % size)
        self.prev_rank = dist.get_global_rank(group, (rank - 1) % size)
        self._requests: list = []
        self._incoming: Tensor | None = None

    def start(self, x: Tensor) -> None:
        x = x.contiguous()
        self._incoming = torch.empty_like(x)
        ops = [
            dist.P2POp(dist.isend, x, self.next_rank, group=self.group),
            dist.P2POp(dist.irecv, self._incoming, self.prev_rank, group=self.group),
        ]
        self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> Tensor:
        for request in self._requests:
            request.wait()
        incoming, self._incoming, self._requests = self._incoming, None, []
        assert incoming is not None, "RingExchange.wait() called before start()"
        return incoming
