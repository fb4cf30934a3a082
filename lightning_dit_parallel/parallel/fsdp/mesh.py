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


#: Axes over which every rank calls the pipeline's encoders the same number of times with the same inputs: all but
#: ``dp`` (whose groups encode different prompts), which joins with FSDP (its groups then run equal batch counts).
ENCODER_AXES: tuple[str, ...] = ("cfg", "pp", "ring", "ulysses", "tp")


def shards_encoders(fsdp: bool, pp: int, tp: int) -> bool:
    """Whether a layout shards the pipeline's encoders by default: when it cuts the DiT's memory (FSDP, pipeline
    stages or tensor parallelism), the encoders are cut too, else a large text encoder would dominate a rank."""
    return fsdp or pp > 1 or tp > 1


def encoder_mesh(mesh: DeviceMesh, fsdp: bool) -> DeviceMesh:
    """A 1-D mesh named ``"encoders"``: the ranks that shard the encoders (``ENCODER_AXES``, plus ``dp`` with FSDP)."""
    return mesh[(("dp",) if fsdp else ()) + ENCODER_AXES]._flatten("encoders")


def encoder_rows_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A 1-D mesh named ``"encoder_rows"`` over ``ENCODER_AXES``: the ranks that encode the same prompts, over which a
    sharded encoder's batch is split (``encoder_rows.py``)."""
    return mesh[ENCODER_AXES]._flatten("encoder_rows")
