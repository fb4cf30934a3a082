"""Forward-hook helpers shared by the parallelizers: removing installed hooks (routing one module's attention to
another kernel during its forward lives in ``attention_route.py``); ``WeightHooks``, the hooks that only bring a
module's weights in and out."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.hooks import RemovableHandle


def inert_hook(*args, **kwargs) -> None:
    """Put in a hook's place in a module's hook order when another part runs that hook itself, or nothing should run
    (``cache/weight_gate.py``, ``fsdp/row_stream.py``)."""
    return None


def remove_handles(handles: list[RemovableHandle]) -> None:
    """Remove every hook in ``handles`` and empty the list (so a second call does nothing)."""
    for handle in handles:
        handle.remove()
    handles.clear()


@dataclass(frozen=True)
class WeightHooks:
    """A forward pre-hook that brings a module's weights in (FSDP's all-gather, offload's host-to-device copy) and the
    forward hook that frees them again. They touch nothing but the module's weights, so a caller that does not compute
    the module (step caching's skipped blocks) may leave both out, together (``cache/weight_gate.py``). Parallelizers
    that install such hooks list them with a ``weight_hooks(module) -> list[WeightHooks]`` method."""

    pre: RemovableHandle
    post: RemovableHandle
