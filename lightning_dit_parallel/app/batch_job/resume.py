"""Resume: the samples still to do, computed from the output folder by every process before any collective.

Every process (the one the user started and every rank a launcher starts) reads the same folder before its process
group exists, so every rank sees the same list of remaining global indices; Lightning's predict sampler then splits
that list over the data-parallel groups as usual. Nothing is written to the folder before every rank has read it
(the first sample is written after the process group formed, which needs every rank).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import DataLoader, Subset

#: Variables in which launchers give a process its place before Lightning runs: torchrun (``RANK``, ``GROUP_RANK``),
#: srun (``SLURM_PROCID``), Lightning's launcher (``NODE_RANK`` on every node, ``LOCAL_RANK`` on the ranks it starts).
RANK_VARIABLES = ("RANK", "GROUP_RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


def is_first_process() -> bool:
    """Whether this process will be global rank 0: every rank variable a launcher set is 0 (or none is set)."""
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


@dataclass(frozen=True)
class ResumePoint:
    """Where a job stands: ``total`` samples, of which ``done`` are on disk; ``remaining`` global indices to do.

    ``padding``: finished samples predicted again (and not written) so that every data-parallel group gets at least
    one sample when fewer than ``min_samples`` remain (the strategies refuse a group without samples).
    """

    total: int
    done: int
    remaining: tuple[int, ...]
    padding: tuple[int, ...] = ()

    @property
    def requests(self) -> list[int]:
        """The global indices the loader yields: the remaining ones, then the padding."""
        return [*self.remaining, *self.padding]


def resume_point(total: int, finished: set[int], min_samples: int = 1) -> ResumePoint:
    """The remaining indices in order, padded with finished ones up to ``min_samples`` when some remain."""
    remaining = tuple(i for i in range(total) if i not in finished)
    padding: tuple[int, ...] = ()
    if 0 < len(remaining) < min_samples:
        padding = tuple(sorted(finished))[: min_samples - len(remaining)]
    return ResumePoint(total, len(finished), remaining, padding)


def remaining_loader(loader: DataLoader, remaining: Sequence[int], index_key: str = "index") -> DataLoader:
    """A ``DataLoader`` like ``loader`` over the positions ``remaining`` of its dataset (``loader`` itself when
    nothing is skipped).

    The dataset's item at position ``i`` must carry global index ``i`` under ``index_key`` (``DigitRequests``,
    ``PromptRequests``); this is checked on the first and last remaining item. ``loader`` must batch with
    ``batch_size`` (not a custom ``batch_sampler``) and must not shuffle: resume needs a fixed order of requests.
    """
    dataset = loader.dataset
    if len(remaining) == len(dataset):  # type: ignore[arg-type]
        return loader
    if loader.batch_size is None:
        raise ValueError("Resume needs a DataLoader that batches with batch_size, not a custom batch_sampler.")
    for position in {remaining[0], remaining[-1]} if remaining else ():
        item = dataset[position]
        found = item.get(index_key) if isinstance(item, dict) else None
        if found is None or int(found) != position:
            raise ValueError(
                f"Resume needs requests whose global index (batch key {index_key!r}) equals their position"
                f" in the dataset; position {position} holds {found!r}."
            )
    kwargs = dict(
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(Subset(dataset, list(remaining)), **kwargs)
