"""Global block positions inside a pipeline stage's block loops.

A stage iterates only its own blocks of each block list (``loop.py``), so a loop that counts them with ``enumerate``
would count from 0 at the stage's first block. DiTs read things by the block's position in their loops: ControlNet
residuals (Flux ``samples[index_block // ceil(L / n)]``, SD3 ``samples[int(index_block / (L / n))]``, Sana
``samples[index_block - 1]`` after block ``index_block > 0``, Cosmos ``{block_idx: residual}`` every n blocks) and
per-block modulation (Chroma slices its ``pooled_temb`` at ``6 * index_block``). Each family has its own rule; rather
than translate every rule, the stage's view of a list counts from the position, in that list, of its first item: the
DiT's own rule then reads the entries of the blocks the stage runs, whatever the rule is.

How: ``enumerate`` is looked up in the globals of the DiT's forward (its module's namespace) before the builtins.
While a pipeline is installed, ``install`` puts ``stage_enumerate`` there: for a stage's block list it is
``enumerate(blocks, start=offset)``, for any other iterable exactly the builtin. ``remove`` puts the previous name
back once the last pipeline using that namespace is removed. The DiT's forward is not changed.

Known limit: a loop that counts its blocks another way (a counter of its own, ``range(len(blocks))`` with
indexing) is not covered; indexing a released block raises (``stages.ReleasedBlock``).
"""

from __future__ import annotations

import builtins
import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn

#: the attribute of a stage's block-list view that holds the position of its first item in the whole list
OFFSET_ATTRIBUTE = "_pipeline_offset"


def stage_enumerate(iterable: Any, start: int = 0) -> builtins.enumerate:
    """``enumerate`` that counts a pipeline stage's block list from its global position (see the module docstring)."""
    offset = iterable.__dict__.get(OFFSET_ATTRIBUTE, 0) if isinstance(iterable, nn.Module) else 0
    return builtins.enumerate(iterable, start + offset)


@dataclass
class _Installed:
    previous: Any  # what the namespace held under "enumerate" (``_ABSENT``: nothing)
    count: int = 0


_ABSENT = object()
# namespace id -> what was there and how many pipelines use it: every model of one module shares its namespace
_INSTALLED: dict[int, _Installed] = {}


@dataclass
class GlobalPositions:
    """``stage_enumerate`` installed in the namespaces of one DiT's forward; ``remove()`` undoes it."""

    namespaces: list[dict] = field(default_factory=list)

    def remove(self) -> None:
        for namespace in self.namespaces:
            entry = _INSTALLED.get(id(namespace))
            if entry is None:
                continue
            entry.count -= 1
            if entry.count == 0:
                del _INSTALLED[id(namespace)]
                if entry.previous is _ABSENT:
                    namespace.pop("enumerate", None)
                else:
                    namespace["enumerate"] = entry.previous
        self.namespaces.clear()


def forward_namespaces(model: nn.Module) -> list[dict]:
    """The module namespaces whose functions run the DiT's forward: the modules defining ``type(model)`` and its
    bases (outside torch), and the one defining its (unwrapped) ``forward``."""
    namespaces: dict[int, dict] = {}
    forward = inspect.unwrap(type(model).forward)
    candidates = [getattr(forward, "__globals__", None)]
    for cls in type(model).__mro__:
        module = inspect.getmodule(cls)
        if isinstance(module, ModuleType) and not module.__name__.startswith(("torch.", "builtins")):
            candidates.append(vars(module))
    for namespace in candidates:
        if isinstance(namespace, dict):
            namespaces.setdefault(id(namespace), namespace)
    return list(namespaces.values())


def install(model: nn.Module) -> GlobalPositions:
    """Make ``enumerate`` in the DiT's forward count a stage's blocks from their global position."""
    positions = GlobalPositions()
    for namespace in forward_namespaces(model):
        entry = _INSTALLED.get(id(namespace))
        if entry is None:
            entry = _INSTALLED[id(namespace)] = _Installed(namespace.get("enumerate", _ABSENT))
            namespace["enumerate"] = stage_enumerate
        entry.count += 1
        positions.namespaces.append(namespace)
    return positions


__all__ = ["GlobalPositions", "OFFSET_ATTRIBUTE", "forward_namespaces", "install", "stage_enumerate"]
