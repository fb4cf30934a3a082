"""FSDP over data-parallel groups needs every group to run the DiT the same number of times.

A block's parameters are all-gathered over the shard group, data-parallel groups included, every time the
block runs. Lightning's predict sampler deals the samples without repeating any, so with a sample count that
does not split evenly one group can get a batch more than another; its extra all-gathers would wait for
ever (until the timeout). The batch counts are compared once, before the first batch, and an uneven split
is a clear error on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_dit_parallel.utils.logging import rank_zero_log


def check_equal_batch_counts(dataloader: object, group: ProcessGroup, device: torch.device) -> None:
    """All-gather ``len(dataloader)`` over the data-parallel ``group`` and require one count.

    A collective over ``group``: every rank calls it for every predict dataloader. A dataloader without a
    length (an iterable dataset) is not checked.

    Raises:
        ValueError: on every rank of the group, when the counts differ.
    """
    try:
        count = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        count = -1
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)  # (1,) per rank -> N x (1,)
    values = [int(c.item()) for c in counts]
    if -1 in values:
        rank_zero_log(
            "FSDP over data-parallel groups: the dataloader has no length, so equal batch counts are not checked."
        )
        return
    if len(set(values)) > 1:
        raise ValueError(
            f"FSDP shards parameters over the data-parallel groups, so every group must run the same number of"
            f" batches, but the predict dataloader gives the {len(values)} data-parallel ranks {values} batches."
            " Use a number of samples that the data-parallel degree times the batch size divides, or dp_degree=1."
        )
