"""A fresh key namespace in the launcher's store for every default process group this job creates.

torchrun's agents host one TCPStore for the whole job, and ``torch.distributed.init_process_group("env://")``
puts every default group under the same keys (``default_pg/0/...``: the group counter restarts when the group is
destroyed). A second group in the same processes (a second ``trainer.predict``) then reads the first group's stale
gloo addresses and fails or waits for the timeout. Each group here gets its own prefix, numbered by a counter in
the store itself, so no process keeps any state: the k-th ``add`` of every rank happens before any rank can
finish creating group k (creating it connects all ranks), hence before any rank's (k+1)-th ``add``, and
``(add - 1) // world_size`` is the same k on every rank.

Where rank 0 hosts the store (Lightning's launcher, SLURM: ``env://`` makes rank 0 serve it on ``MASTER_PORT``),
rank 0 keeps serving it after its group is destroyed, for the life of the process (``_SERVED``). Otherwise a
rank that finished its teardown first and started the next rendezvous would join the old store just before rank
0 closed it, and wait for the timeout; with the store kept, every rendezvous on that port meets the same store
(later ``env://`` stores of rank 0 on that port share its server) and the counter keeps counting.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment

#: The store key counting the process groups created on this store.
GENERATION_KEY = "lightning_dit_parallel/groups"

#: The stores this process serves as rank 0, by (address, port): kept so that their server outlives each group.
_SERVED: dict[tuple[str, int], dist.Store] = {}


def group_store(cluster_environment: ClusterEnvironment, rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The launcher's store (``MASTER_ADDR``/``MASTER_PORT`` from ``cluster_environment``) under a prefix of its own
    for the next default process group; pass it to ``init_process_group(store=..., rank=..., world_size=...)``.

    Every rank must call it once per process group, in the same order (it is part of the rendezvous).
    """
    os.environ["MASTER_ADDR"] = cluster_environment.main_address
    os.environ["MASTER_PORT"] = str(cluster_environment.main_port)
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    if rank == 0:
        _SERVED.setdefault((cluster_environment.main_address, int(cluster_environment.main_port)), store)
    return numbered_namespace(store, GENERATION_KEY, world_size, "lightning_dit_parallel/group")


def numbered_namespace(store: dist.Store, counter: str, world_size: int, prefix: str) -> dist.PrefixStore:
    """``store`` under ``prefix`` + the next number of ``counter``: the same number on every rank, provided every rank
    calls it once per use and the ranks meet in a collective between two uses (see the module docstring)."""
    generation = (store.add(counter, 1) - 1) // world_size
    return dist.PrefixStore(f"{prefix}{generation}", store)


def predict_namespace(world_size: int) -> dist.Store | None:
    """Keys of this predict alone in the store of a default process group that someone else created (a script that
    called ``init_process_group`` itself); ``None`` when that group has no store. Call on every rank, once per
    predict, before the predict's first collective."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None
    return numbered_namespace(store, "lightning_dit_parallel/predicts", world_size, "lightning_dit_parallel/predict")
