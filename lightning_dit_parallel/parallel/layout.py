"""The parallel layout: how many ranks each kind of parallelism uses, and the one device mesh built from it.

Vocabulary: an *axis* is a named dimension of the device mesh; a *dim* is a tensor dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal, Union

from lightning_dit_parallel.parallel.nodes import axes_across_nodes, describe_nodes

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Degree = Union[int, Literal["auto"]]

#: Mesh axes from outermost to innermost. Ulysses and tensor parallel are innermost because their collectives
#: (an all-to-all, two all-reduces per layer) are the most bandwidth-hungry; neighbouring ranks (same node, NVLink)
#: should carry them. Tensor parallel is innermost: it splits the heads first, Ulysses splits each rank's heads.
MESH_AXES: tuple[str, ...] = ("dp", "cfg", "pp", "ring", "ulysses", "tp")


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of each parallelism; ``1`` means off. At most one degree may be ``"auto"``.

    Args:
        dp: data parallel degree: groups of ranks that generate different samples.
        cfg: classifier-free-guidance parallel degree (1 or 2): the conditional and unconditional halves of
            the doubled batch, or the separate conditional and unconditional DiT calls of each step, run on different
            ranks (see ``lightning_dit_parallel.parallel.guidance``).
        pp: pipeline degree: number of stages the transformer blocks are split into.
        ring: ring-attention degree (sequence parallel, point-to-point key/value exchange).
        ulysses: Ulysses degree (sequence parallel, all-to-all between the sequence and the heads).
        tp: tensor-parallel degree: the attention heads and MLP features of every block are split over this many
            ranks (torch DTensor column-/row-wise sharding); two all-reduces per block.
        fsdp: shard parameters over the ranks that compute with the same weights.

    Raises:
        ValueError: for a degree that is not a positive integer or ``"auto"``, for more than one ``"auto"``,
            or for a cfg degree other than 1 or 2. Every message names all the values.
    """

    dp: Degree = 1
    cfg: Degree = 1
    pp: Degree = 1
    ring: Degree = 1
    ulysses: Degree = 1
    tp: Degree = 1
    fsdp: bool = False

    def __post_init__(self) -> None:
        degrees = self.degrees()
        bad = {
            k: v
            for k, v in degrees.items()
            if not (v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1))
        }
        if bad:
            raise ValueError(
                f"Every parallel degree must be a positive integer or 'auto'; got {bad} in {self.describe()}."
            )
        autos = [k for k, v in degrees.items() if v == "auto"]
        if len(autos) > 1:
            raise ValueError(f"At most one parallel degree may be 'auto'; got {autos} in {self.describe()}.")
        if self.cfg not in (1, 2, "auto"):
            raise ValueError(
                f"cfg degree must be 1 or 2 (the doubled batch has two halves); got {self.cfg} in {self.describe()}."
            )
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"fsdp must be a bool; got {self.fsdp!r} in {self.describe()}.")

    @classmethod
    def requested(
        cls,
        *,
        dp: Degree = 1,
        cfg: Degree = 1,
        pp: Degree = 1,
        ring: Degree = 1,
        ulysses: Degree = 1,
        tp: Degree = 1,
        fsdp: bool = False,
    ) -> ParallelLayout:
        """The layout a strategy is asked for: the one rule for ``"auto"`` degrees before the world size is known.

        ``dp="auto"`` means "the ranks the other degrees leave" and yields to any other ``"auto"`` degree: it becomes 1,
        and that degree takes the ranks (``SequenceParallelStrategy(ulysses_degree="auto")``: dp 1, Ulysses over all
        ranks). Any other pair of ``"auto"`` degrees is an error (``ParallelLayout``). ``resolve(world_size)`` then
        fills in the one ``"auto"`` left. Every strategy builds its layout through this method.
        """
        degrees = dict(cfg=cfg, pp=pp, ring=ring, ulysses=ulysses, tp=tp)
        if dp == "auto" and "auto" in degrees.values():
            dp = 1
        return cls(dp=dp, **degrees, fsdp=fsdp)

    def degrees(self) -> dict[str, Degree]:
        """The degrees by mesh axis name, outermost axis first."""
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def describe(self, ranks_per_node: int | None = None) -> str:
        """One line naming every value, e.g. ``dp=1 cfg=1 pp=1 ring=2 ulysses=2 tp=1 fsdp=False``.

        Args:
            ranks_per_node: with the processes per node (of a resolved layout), the line also says which axes
                have groups that cross nodes, e.g. ``... fsdp=False | 2 nodes x 2 ranks, across nodes: ring``.
        """
        values = " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        if ranks_per_node is None:
            return values
        self._require_resolved()
        return f"{values} | {describe_nodes({a: int(d) for a, d in self.degrees().items()}, ranks_per_node)}"

    def axes_across_nodes(self, ranks_per_node: int) -> tuple[str, ...]:
        """The mesh axes with a group whose ranks lie on more than one node, for ranks numbered node by node with
        ``ranks_per_node`` processes per node (see ``nodes.py``). Pure computation; the layout must be resolved."""
        self._require_resolved()
        return axes_across_nodes({a: int(d) for a, d in self.degrees().items()}, ranks_per_node)

    def resolve(self, world_size: int) -> ParallelLayout:
        """Fill in ``"auto"`` and check that the degrees multiply to ``world_size``.

        Pure computation with no communication: every rank reaches the same verdict before any collective.

        Raises:
            ValueError: when the product of the degrees does not equal ``world_size`` (or cannot, with "auto").
        """
        degrees = self.degrees()
        fixed = math.prod(v for v in degrees.values() if v != "auto")
        autos = [k for k, v in degrees.items() if v == "auto"]
        if autos:
            if world_size % fixed:
                raise ValueError(
                    f"Cannot resolve {autos[0]}='auto': the other degrees multiply to {fixed}, which does not divide"
                    f" the world size {world_size} ({self.describe()})."
                )
            resolved = replace(self, **{autos[0]: world_size // fixed})
            return resolved.resolve(world_size)
        if fixed != world_size:
            raise ValueError(
                f"The parallel degrees multiply to {fixed} but the world size is {world_size} ({self.describe()})."
                " Their product dp*cfg*pp*ring*ulysses*tp must equal the number of processes (devices x nodes)."
            )
        return self

    @property
    def sequence_degree(self) -> int:
        """Ranks that share one sample's token sequence: ``ring * ulysses``."""
        self._require_resolved()
        return int(self.ring) * int(self.ulysses)

    @property
    def model_parallel_degree(self) -> int:
        """Ranks that work on the same batch: ``cfg * pp * ring * ulysses * tp``."""
        self._require_resolved()
        return int(self.cfg) * int(self.pp) * self.sequence_degree * int(self.tp)

    def _require_resolved(self) -> None:
        if "auto" in self.degrees().values():
            raise RuntimeError(f"Call resolve(world_size) first; the layout still has 'auto' ({self.describe()}).")

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build the named device mesh over the default process group (a collective: call on every rank).

        Axes of size 1 are kept so that every axis name is always present.
        """
        from torch.distributed.device_mesh import init_device_mesh

        self._require_resolved()
        shape = tuple(int(v) for v in self.degrees().values())
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)

    def coordinates(self, rank: int) -> dict[str, int]:
        """The mesh coordinate of a global rank along every axis, without building a mesh.

        Ranks are laid out row-major over ``MESH_AXES`` (tp varies fastest), as ``build_mesh`` does.
        """
        self._require_resolved()
        degrees = [int(v) for v in self.degrees().values()]
        world = math.prod(degrees)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the world of size {world} ({self.describe()}).")
        coords: dict[str, int] = {}
        for axis, degree in reversed(list(zip(MESH_AXES, degrees))):
            coords[axis] = rank % degree
            rank //= degree
        return {axis: coords[axis] for axis in MESH_AXES}
