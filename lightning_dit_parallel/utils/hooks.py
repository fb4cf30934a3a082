"""Forward-hook helpers shared by the parallelizers: removing installed hooks (routing one module's attention to
another kernel during its forward lives in ``attention_route.py``)."""

from __future__ import annotations

from torch.utils.hooks import RemovableHandle


def remove_handles(handles: list[RemovableHandle]) -> None:
    """Remove every hook in ``handles`` and empty the list (so a second call does nothing)."""
    for handle in handles:
        handle.remove()
    handles.clear()
