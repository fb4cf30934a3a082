"""At teardown after a failure: may the ranks still undo the parallelizers with collectives?

Undoing FSDP, tensor parallelism and pipeline stages gathers the weights over the ranks. After an exception on one
rank its peers may be dead, or inside another collective of the step; a rank that started the gathers then would
wait for them there, and gloo aborts a process whose peers run a mismatched collective. So a rank that failed
gathers only when every rank has reached teardown: each rank adds itself to a count in the process group's store
as its teardown starts, and a failed rank waits a few seconds (``AGREEMENT_WAIT_S``) for the count to reach the
world size. The outcome is written once, with ``compare_set``, so that every rank follows the same decision:

- ``restore``: every rank is in teardown (an error that every rank raised in the same place, such as the
  replicated-input guard's or a bug in ``predict_step``): the model is given back whole, as after a success.
- ``discard``: some rank did not come (it is dead, or still waiting in a collective of the step, which fails once
  this rank closes its process group): the parallelizers are undone without collectives and the weights this rank
  holds only a part of become meta tensors (``incomplete.py``); the module must be loaded again.

A rank that succeeded counts itself and gathers, unless a failed rank has decided to discard already. A rank whose
store is gone (its host died) discards. Layouts whose undo needs no peer (``Parallelized.removal_needs_peers``) skip
all of this.
"""

from __future__ import annotations

import time

import torch.distributed as dist

#: Seconds a failed rank waits in teardown for every rank to arrive there.
AGREEMENT_WAIT_S = 5.0

_ARRIVED = "teardown/arrived"
_DECISION = "teardown/decision"
RESTORE = b"restore"
DISCARD = b"discard"


def may_gather(store: dist.Store | None, world_size: int, failed: bool, wait_s: float = AGREEMENT_WAIT_S) -> bool:
    """Report this rank's arrival in teardown and return whether the parallelizers may be removed with collectives
    (the same answer on every rank that asks after the decision was taken).

    Args:
        store: a store with keys of this process group alone (``None``: no store, so only a success gathers).
        world_size: ranks in the process group.
        failed: whether this rank's predict raised.
        wait_s: with ``failed``, how long to wait for the other ranks.
    """
    if store is None:
        return not failed
    try:
        if store.add(_ARRIVED, 1) >= world_size:  # the last to arrive: everyone is here
            return store.compare_set(_DECISION, "", RESTORE) == RESTORE
        if not failed:
            return not (store.check([_DECISION]) and store.get(_DECISION) == DISCARD)
        deadline = time.monotonic() + wait_s
        while store.add(_ARRIVED, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.02)
        everyone = store.add(_ARRIVED, 0) >= world_size
        return store.compare_set(_DECISION, "", RESTORE if everyone else DISCARD) == RESTORE
    except (RuntimeError, OSError):  # DistStoreError and connection errors: the store's host is gone
        return False
