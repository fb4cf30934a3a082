"""Count the bytes this rank sends through torch's functional collectives (what DTensor redistributions call).

``CommCounter`` wraps the ``torch.distributed`` functions; DTensor (tensor parallelism's all-reduces and
all-gathers) calls ``torch.ops._c10d_functional`` instead, which this dispatch mode sees. For benchmarks:
``with FunctionalCommCounter() as counter: ...``; ``counter.bytes_sent`` by kind, counted like ``CommCounter``:

* ``all_reduce``: the tensor times ``2(N-1)/N``, what a ring all-reduce sends from each rank
  (``counter.payload["all_reduce"]``: the tensors' own bytes);
* ``all_gather``: this rank's tensor once per peer, ``(N-1)`` times;
* ``reduce_scatter``: ``(N-1)/N`` of the input; ``all_to_all``: ``(N-1)/N`` of the input.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

_OPS = torch.ops._c10d_functional


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_size(name: str) -> int:
    return _resolve_process_group(name).size()


class FunctionalCommCounter(TorchDispatchMode):
    """Bytes sent by this rank through functional collectives (``bytes_sent``) and their tensors' bytes
    (``payload``), by kind, and every call as ``(kind, tensor bytes)`` in order (``events``), while the ``with``
    block runs."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.payload: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(t is DTensor for t in types):
            return NotImplemented  # DTensor turns the op into local ops and collectives, which come back here
        packet = func._overloadpacket
        if packet is _OPS.all_reduce:
            n = _group_size(args[2])
            self._record("all_reduce", args[0], _nbytes(args[0]) * 2 * (n - 1) // n)
        elif packet is _OPS.all_gather_into_tensor:
            self._record("all_gather", args[0], _nbytes(args[0]) * (int(args[1]) - 1))
        elif packet is _OPS.reduce_scatter_tensor:
            n = int(args[2])
            self._record("reduce_scatter", args[0], _nbytes(args[0]) * (n - 1) // n)
        elif packet is _OPS.all_to_all_single:
            n = _group_size(args[3])
            self._record("all_to_all", args[0], _nbytes(args[0]) * (n - 1) // n)
        return func(*args, **kwargs)

    def _record(self, kind: str, tensor: torch.Tensor, sent: int) -> None:
        self.bytes_sent[kind] += sent
        self.payload[kind] += _nbytes(tensor)
        self.calls[kind] += 1
        self.events.append((kind, _nbytes(tensor)))
