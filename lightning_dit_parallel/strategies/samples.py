"""Every data-parallel group needs a sample: fewer predict samples than groups is a clear error on every rank.

Lightning's predict sampler deals the samples over the data-parallel groups without repeating any, and fails
with a bare ``AssertionError`` on a rank whose group would get none (the others go on and wait for it in their
first collective). The strategy checks the sample count as soon as Lightning has requested the predict
dataloaders, before their sampler is built and before any collective: the dataset is the same on every rank, so
every rank raises the same ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset


def check_samples_cover_groups(dataloaders: Any, dp_degree: int, layout: str) -> None:
    """Require at least ``dp_degree`` samples in every predict dataloader that Lightning will shard.

    Dataloaders without a length (iterable datasets), with a sampler that is already distributed, or with no
    samples at all (Lightning runs no batch anywhere) are not checked.

    Args:
        dataloaders: what a predict dataloader source returns (a dataloader or a collection of them).
        dp_degree: the number of data-parallel groups.
        layout: the layout's description, for the message.

    Raises:
        ValueError: naming both counts when a dataloader has fewer samples than data-parallel groups.
    """
    loaders = CombinedLoader(dataloaders, "sequential").flattened
    for index, loader in enumerate(loaders):
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            continue
        if isinstance(loader.sampler, DistributedSampler):
            continue
        try:
            samples = len(loader.sampler)  # type: ignore[arg-type]
        except TypeError:
            continue
        if 0 < samples < dp_degree:
            which = f"predict dataloader {index}" if len(loaders) > 1 else "The predict dataloader"
            raise ValueError(
                f"{which[0].upper()}{which[1:]} has {samples} sample{'s' if samples != 1 else ''} for {dp_degree}"
                f" data-parallel groups (dp_degree={dp_degree}; {layout}): every group needs at least one sample,"
                f" and {dp_degree - samples} would get none. Predict at least {dp_degree} samples, or use fewer"
                f" data-parallel groups (dp_degree <= {samples}, e.g. more model-parallel ranks or fewer devices)."
            )


def checked_source(source: Any, check: Callable[[Any], None]) -> Callable[[], None]:
    """Make Lightning's dataloader ``source`` run ``check`` on what it returns; returns the undo.

    ``source`` is the ``_DataLoaderSource`` of a Lightning loop; a source without a ``dataloader`` method is left
    alone (nothing is checked).
    """
    request = getattr(source, "dataloader", None)
    state = getattr(source, "__dict__", None)
    if request is None or state is None or "dataloader" in state:  # nothing to wrap, or wrapped already
        return lambda: None

    def dataloader() -> Any:
        loaders = request()
        check(loaders)
        return loaders

    source.dataloader = dataloader

    def undo() -> None:
        source.__dict__.pop("dataloader", None)

    return undo
