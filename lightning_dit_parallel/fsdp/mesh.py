"""The FSDP shard mesh: every rank that computes with the same weights at the same time."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

#: Ranks along these axes hold the same weights and run every block's forward in step: data-parallel
#: groups (their samples differ, their weights do not), the two cfg halves and the sequence-parallel ranks.
#: Pipeline stages hold different blocks, so FSDP does not shard over ``pp``; tensor-parallel ranks hold different
#: slices of the blocks (DTensors on the ``tp`` axis), which FSDP2 shards further over these axes (a 2-D layout).
SHARD_AXES: tuple[str, ...] = ("dp", "cfg", "ring", "ulysses")


def shard_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A 1-D mesh named ``"fsdp"`` over ``SHARD_AXES`` of a mesh built by ``ParallelLayout.build_mesh``.

    Ranks of one pipeline stage form one FSDP group; with ``pp == 1`` that is the whole world.
    """
    return mesh[SHARD_AXES]._flatten("fsdp")
