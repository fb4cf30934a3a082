"""Count the bytes this rank sends through torch.distributed, by wrapping the calls the package makes.

For benchmarks: ``with CommCounter() as counter: ...`` patches ``dist.all_to_all_single``,
``dist.all_gather``, ``dist.all_gather_into_tensor``, ``dist.broadcast``, ``dist.batch_isend_irecv`` and
``dist.send`` for the block's duration and records what leaves this rank (``dist.isend`` is left alone:
``P2POp`` accepts only the original function; non-blocking sends are counted in ``batch_isend_irecv``):

* all-to-all: the input minus the chunk kept by this rank, ``(N-1)/N`` of it;
* all-gather: this rank's tensor once per peer, ``(N-1)`` times;
* point-to-point: every tensor sent;
* broadcast: the tensor times ``(N-1)`` on the source rank.
"""

from __future__ import annotations

from collections import defaultdict

import torch.distributed as dist


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    def __init__(self) -> None:
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self._saved: dict[str, object] = {}

    @property
    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def __enter__(self) -> CommCounter:
        counter = self.bytes_sent
        originals = {name: getattr(dist, name) for name in (
            "all_to_all_single", "all_gather", "all_gather_into_tensor", "broadcast", "batch_isend_irecv", "send",
        )}
        self._saved = originals

        def all_to_all_single(output, input, *args, group=None, **kwargs):
            n = dist.get_world_size(group)
            counter["all_to_all"] += _nbytes(input) * (n - 1) // n
            return originals["all_to_all_single"](output, input, *args, group=group, **kwargs)

        def all_gather(tensor_list, tensor, group=None, **kwargs):
            counter["all_gather"] += _nbytes(tensor) * (dist.get_world_size(group) - 1)
            return originals["all_gather"](tensor_list, tensor, group=group, **kwargs)

        def all_gather_into_tensor(output, input, group=None, **kwargs):
            counter["all_gather"] += _nbytes(input) * (dist.get_world_size(group) - 1)
            return originals["all_gather_into_tensor"](output, input, group=group, **kwargs)

        def broadcast(tensor, src=None, group=None, **kwargs):
            if dist.get_rank() == src:
                counter["broadcast"] += _nbytes(tensor) * (dist.get_world_size(group) - 1)
            return originals["broadcast"](tensor, src, group=group, **kwargs)

        def batch_isend_irecv(ops):
            for op in ops:
                if getattr(op.op, "__name__", "") == "isend":
                    counter["p2p"] += _nbytes(op.tensor)
            return originals["batch_isend_irecv"](ops)

        def send(tensor, *args, **kwargs):
            counter["p2p"] += _nbytes(tensor)
            return originals["send"](tensor, *args, **kwargs)

        for name, fn in dict(locals()).items():
            if name in originals:
                setattr(dist, name, fn)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
