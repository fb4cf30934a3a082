"""The process groups of the two sequence-parallel mesh axes."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from lightning_dit_parallel.parallel.sequence.comm import group_rank, group_size


@dataclass(frozen=True)
class SequenceGroups:
    """Ulysses (inner) and ring (outer) groups; ``None`` for an axis of size 1.

    A rank's shard of the token sequence is ``ring_rank * ulysses_size + ulysses_rank``.
    """

    ulysses: ProcessGroup | None = None
    ring: ProcessGroup | None = None

    @property
    def ulysses_size(self) -> int:
        return group_size(self.ulysses)

    @property
    def ring_size(self) -> int:
        return group_size(self.ring)

    @property
    def size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def rank(self) -> int:
        return group_rank(self.ring) * self.ulysses_size + group_rank(self.ulysses)

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> SequenceGroups:
        """Groups of the ``ulysses`` and ``ring`` axes of a mesh built by ``ParallelLayout.build_mesh``."""

        def axis_group(axis: str) -> ProcessGroup | None:
            return mesh.get_group(axis) if mesh[axis].size() > 1 else None

        return cls(ulysses=axis_group("ulysses"), ring=axis_group("ring"))
