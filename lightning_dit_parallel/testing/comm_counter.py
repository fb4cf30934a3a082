"""Count the bytes this rank sends through torch.distributed, by wrapping the calls the package makes.

For benchmarks: ``with CommCounter() as counter: ...`` replaces the ``torch.distributed`` functions below
for the block's duration and records, by kind, what leaves this rank:

* ``all_to_all``: ``all_to_all_single``'s input minus the chunk this rank keeps, ``(N-1)/N`` of it;
* ``all_gather``: ``all_gather``, ``all_gather_into_tensor`` and ``all_gather_single`` (FSDP2's parameter
  all-gather): this rank's tensor once per peer, ``(N-1)`` times;
* ``p2p``: every tensor sent by ``send``, by ``batch_isend_irecv``, and, with ``count_isend``, by ``isend``;
* ``broadcast``: ``broadcast`` and ``broadcast_object_list`` (pickled size) times ``(N-1)`` on the source;
* ``all_reduce``: ``all_reduce``'s tensor times ``2(N-1)/N``, what a ring all-reduce sends from each rank.

``isend`` is only wrapped with ``count_isend=True``: a ``P2POp`` (ring attention's transfers) accepts only
the original function, so leave it off where ring attention runs; those sends are counted in
``batch_isend_irecv``.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Callable

import torch.distributed as dist


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    """Bytes sent by this rank, by kind (``bytes_sent``), while the ``with`` block runs.

    Args:
        count_isend: also wrap ``dist.isend`` (point-to-point code that calls it directly, e.g. pipeline stages).
    """

    def __init__(self, count_isend: bool = False) -> None:
        self.count_isend = count_isend
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self._saved: dict[str, Callable] = {}

    @property
    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def __enter__(self) -> CommCounter:
        wrappers = self._wrappers()
        self._saved = {name: getattr(dist, name) for name in wrappers if hasattr(dist, name)}
        for name in self._saved:
            setattr(dist, name, wrappers[name])
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}

    def _wrappers(self) -> dict[str, Callable]:
        counter = self.bytes_sent
        original = {
            name: getattr(dist, name, None)
            for name in (
                "all_to_all_single",
                "all_gather",
                "all_gather_into_tensor",
                "all_gather_single",
                "broadcast",
                "broadcast_object_list",
                "batch_isend_irecv",
                "send",
                "isend",
                "all_reduce",
            )
        }

        def peers(group) -> int:
            return dist.get_world_size(group) - 1

        def all_to_all_single(output, input, *args, group=None, **kwargs):
            n = dist.get_world_size(group)
            counter["all_to_all"] += _nbytes(input) * (n - 1) // n
            return original["all_to_all_single"](output, input, *args, group=group, **kwargs)

        def all_gather(tensor_list, tensor, group=None, **kwargs):
            counter["all_gather"] += _nbytes(tensor) * peers(group)
            return original["all_gather"](tensor_list, tensor, group=group, **kwargs)

        def all_gather_into_tensor(output, input, group=None, **kwargs):
            counter["all_gather"] += _nbytes(input) * peers(group)
            return original["all_gather_into_tensor"](output, input, group=group, **kwargs)

        def all_gather_single(output, input, group=None, **kwargs):
            counter["all_gather"] += _nbytes(input) * peers(group)
            return original["all_gather_single"](output, input, group=group, **kwargs)

        def broadcast(tensor, src=None, group=None, **kwargs):
            source = src
            if source is None and kwargs.get("group_src") is not None:  # the source named by its rank in the group
                source = dist.get_global_rank(group or dist.group.WORLD, kwargs["group_src"])
            if dist.get_rank() == source:
                counter["broadcast"] += _nbytes(tensor) * peers(group)
            return original["broadcast"](tensor, src, group=group, **kwargs)

        def broadcast_object_list(objects, src=None, group=None, **kwargs):
            if dist.get_rank() == src:  # pickled size plus the size tensor, to every other rank
                counter["broadcast"] += (len(pickle.dumps(objects)) + 8) * peers(group)
            return original["broadcast_object_list"](objects, src, group=group, **kwargs)

        def all_reduce(tensor, *args, group=None, **kwargs):
            n = dist.get_world_size(group)
            counter["all_reduce"] += _nbytes(tensor) * 2 * (n - 1) // n
            return original["all_reduce"](tensor, *args, group=group, **kwargs)

        def batch_isend_irecv(ops):
            for op in ops:
                if getattr(op.op, "__name__", "") == "isend":
                    counter["p2p"] += _nbytes(op.tensor)
            return original["batch_isend_irecv"](ops)

        def send(tensor, *args, **kwargs):
            counter["p2p"] += _nbytes(tensor)
            return original["send"](tensor, *args, **kwargs)

        def isend(tensor, *args, **kwargs):
            counter["p2p"] += _nbytes(tensor)
            return original["isend"](tensor, *args, **kwargs)

        wrappers = {
            "all_to_all_single": all_to_all_single,
            "all_gather": all_gather,
            "all_gather_into_tensor": all_gather_into_tensor,
            "all_gather_single": all_gather_single,
            "broadcast": broadcast,
            "broadcast_object_list": broadcast_object_list,
            "batch_isend_irecv": batch_isend_irecv,
            "send": send,
            "all_reduce": all_reduce,
        }
        if self.count_isend:
            wrappers["isend"] = isend
        return {name: fn for name, fn in wrappers.items() if original[name] is not None}
