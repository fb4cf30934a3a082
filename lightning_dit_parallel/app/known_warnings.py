"""Warnings a user cannot act on, raised by libraries inside ``Trainer.predict``, filtered by exact origin.

- Lightning 2.6 builds ``torch.utils._pytree.LeafSpec()`` in ``lightning.pytorch.utilities._pytree`` for every
  predict dataloader it flattens; torch >= 2.10 deprecates that class with a ``FutureWarning``
  (``isinstance(treespec, LeafSpec) is deprecated``), printed by every rank. Nothing in the user's code or this
  package causes it, and Lightning's behaviour is unchanged by it.

Only warnings of that category from that module with that message are ignored; every other warning still shows.
"""

from __future__ import annotations

import warnings

#: (category, message regex, module regex) of each filtered warning.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
)


def silence_known_warnings() -> None:
    """Add an ``ignore`` filter for each of ``KNOWN_WARNINGS`` (idempotent: the warnings module drops duplicates)."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
