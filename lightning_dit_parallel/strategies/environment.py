"""Snapshot and restore of the environment variables that process launchers set."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: Variables set by Lightning's launchers and by ``torch.distributed`` initialisation.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")


@contextmanager
def restored_environment(names: tuple[str, ...] = LAUNCHER_VARIABLES) -> Iterator[None]:
    """Put ``names`` back as they were (set, changed or absent) when the block exits."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
