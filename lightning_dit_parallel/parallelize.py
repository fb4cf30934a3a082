"""``parallelize(module, layout, mesh)``: find the planned DiTs in a module and apply every parallelizer.

Each parallelizer is one concern with an apply/remove pair; this function only composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from lightning_dit_parallel.layout import ParallelLayout
from lightning_dit_parallel.plan import find_planned_modules
from lightning_dit_parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.utils.logging import rank_zero_log


class Removable(Protocol):
    def remove(self) -> None: ...


@dataclass
class Parallelized:
    """What ``parallelize`` installed; ``remove()`` undoes all of it, last applied first."""

    paths: list[str] = field(default_factory=list)
    applied: list[Removable] = field(default_factory=list)

    def remove(self) -> None:
        while self.applied:
            self.applied.pop().remove()


def parallelize(module: nn.Module, layout: ParallelLayout, mesh) -> Parallelized:
    """Apply the layout's parallelism to every submodule of ``module`` whose class has a plan.

    Args:
        module: usually the LightningModule; the DiTs inside it are found by their plans.
        layout: a resolved layout (see ``ParallelLayout.resolve``).
        mesh: the device mesh built from ``layout``.

    Raises:
        ValueError: when model parallelism is requested and no submodule has a plan, or a plan does not fit.
    """
    result = Parallelized()
    if layout.sequence_degree == 1:
        return result
    groups = SequenceGroups.from_mesh(mesh)
    for path, dit, plan in find_planned_modules(module):
        result.paths.append(path or type(dit).__name__)
        result.applied.append(apply_sequence_parallel(dit, plan, groups))
    rank_zero_log(f"sequence parallel (ring={layout.ring}, ulysses={layout.ulysses}) on {result.paths}")
    return result
