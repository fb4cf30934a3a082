"""Closing the default process group so that the next ``init_process_group`` on the same address works.

The rendezvous of ``init_process_group`` goes through a TCP store that global rank 0 serves on
``MASTER_ADDR:MASTER_PORT``. A process that runs several ``trainer.predict`` calls (torchrun, Lightning's script
launcher) initialises a group on the same port each time. If a rank finished destroying the old group and
started the next rendezvous while rank 0 was still tearing down, it would join rank 0's *old* store, which then
closes: that rank would wait for ever (until the timeout), and so would rank 0 in the new rendezvous.

So the close is ordered. Right after the rendezvous every rank but 0 opens a plain TCP connection to rank 0's
store (a ``StoreWatch``); it is closed from the other end when that store closes, that is when rank 0 destroys
its group (or exits). At teardown a rank destroys its own group and then waits for that, so it can only start
the next rendezvous once rank 0's old store is gone. Where the store is not served by rank 0 (torchrun's agent
store outlives the ranks) there is nothing to order and nothing is watched.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable

import torch.distributed as dist

from lightning_dit_parallel.utils.logging import log

#: The longest wait for rank 0's store after a failed run: enough for rank 0 to reach its own teardown, short
#: enough not to delay the error much when rank 0 is stuck (its collectives then time out on their own).
FAILED_RUN_WAIT_S = 5.0


class StoreWatch:
    """A plain TCP connection to rank 0's rendezvous store; the store's end closes when the store does."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection

    @classmethod
    def open(cls, address: str, port: int) -> StoreWatch | None:
        """Connect on a rank other than 0 while the store of the current group is up (right after the rendezvous);
        ``None`` on rank 0, where the store is not rank 0's, or when it cannot be reached."""
        if dist.get_rank() == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            return None
        try:
            return cls(socket.create_connection((address, port), timeout=10))
        except OSError:
            return None

    def wait_closed(self, timeout_s: float) -> bool:
        """Wait until the store closed the connection; ``False`` after ``timeout_s`` without that."""
        try:
            self._connection.settimeout(timeout_s)
            while self._connection.recv(4096):  # the store never sends unasked; b"" is the close
                pass
            return True
        except TimeoutError:
            return False
        except OSError:  # a reset: closed too
            return True
        finally:
            self._connection.close()


def close_process_group(watch: StoreWatch | None, healthy: bool, timeout_s: float, barrier: Callable[[], None]) -> None:
    """Destroy the default process group, and return only once rank 0's rendezvous store has closed.

    With ``healthy`` (every peer reached teardown without an error) all ranks pass a barrier first, so that rank 0
    destroys its group when nobody uses it any more; the others then wait up to ``timeout_s`` for its store. After
    an error there is no barrier (a dead or stuck peer would hold it up to the timeout): every rank destroys its
    group at once, which also ends peers' pending collectives, and waits at most ``FAILED_RUN_WAIT_S``.

    Args:
        watch: this rank's ``StoreWatch`` (``None`` on rank 0 or when nothing is watched).
        healthy: whether the run ended without an error on this rank.
        timeout_s: the longest wait for rank 0's store after a healthy run.
        barrier: a barrier over the default group (the strategy's, which knows the backend's needs).
    """
    rank = dist.get_rank()
    wait_s = timeout_s
    if healthy:
        try:
            barrier()
        except Exception as err:  # noqa: BLE001 -- a peer failed after all: close as after an error
            log.warning(f"rank {rank}: barrier before closing the process group failed: {err}")
            wait_s = FAILED_RUN_WAIT_S
    else:
        wait_s = FAILED_RUN_WAIT_S
    gc.collect()  # objects still holding the group's process groups (and so its store) go first
    if dist.is_initialized():
        dist.destroy_process_group()
    if watch is not None and not watch.wait_closed(wait_s):
        log.warning(
            f"rank {rank}: rank 0's rendezvous store did not close within"
            f" {wait_s:.0f} s; a following init_process_group on the same port may fail."
        )
