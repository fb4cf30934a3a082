"""The skip decision of one step: a local statistic, reduced over the ranks that must agree, compared with the
threshold; and its transport down a pipeline.

The statistic is a small vector of sums (``sum |x_t - x_prev|`` and ``sum |x_prev|`` per tensor, over the real tokens
of a sequence-parallel shard: its padding left out), all-reduced over the decision group: every rank of a
sequence-parallel, tensor-parallel or CFG group ends with the same vector, bit for bit (an all-reduce gives every rank
the same result), so every rank takes the same branch, and the ratio is the one the one-process run computes over the
whole tensors (up to the order of the float sums).

Pipeline stages do not reduce: the first stage decides (its ranks reduce among themselves) and sends the decision to
the next stage, point-to-point, before the activations of the same pass; each stage forwards it before its own
activations, so the messages of a pass arrive in the order they are received.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_dit_parallel.parallel.pipeline.comm import StageLink

#: Tag of the decision message between pipeline stages (gloo matches by tag; NCCL by order, which is also kept).
DECISION_TAG = 2323


#: Where a rank's statistic tensor holds sequence-parallel padding: ``(dim, real)``, real tokens first; ``None``: none.
PaddingRows = tuple[int, int] | None


def absolute_sums(current: list[Tensor], previous: list[Tensor], rows: list[PaddingRows] | None = None) -> Tensor:
    """Per tensor pair ``[sum |c - p|, sum |p|]``, in float64: (2 * n,). Empty when there are no tensors.

    ``rows``: per pair, where this rank's shard holds padding tokens (``sequence.sharding.ShardingState
    .padding_rows``); only the real tokens are summed, so that the sums over the ranks are the one-process sums over the
    whole tensors. The padding tokens are not zero inside the blocks (a block computes on them as on any token)."""
    sums = []
    for i, (c, p) in enumerate(zip(current, previous)):
        padding = rows[i] if rows is not None else None
        if padding is not None:
            dim, real = padding
            c, p = c.narrow(dim, 0, real), p.narrow(dim, 0, real)  # (..., local, ...) -> (..., real, ...)
        sums.append((c.double() - p.double()).abs().sum())
        sums.append(p.double().abs().sum())
    if not sums:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(sums)


def reduce_sums(sums: Tensor, group: ProcessGroup | None) -> Tensor:
    """All-reduce (sum) the statistic over ``group``: (2 * n,) -> (2 * n,), the same on every rank of the group. One
    collective per decided step; none for a group of one rank."""
    if group is not None and dist.get_world_size(group) > 1:
        sums = sums.contiguous()
        dist.all_reduce(sums, group=group)  # (2n,) summed over the ranks that must agree
    return sums


def relative_change(sums: Tensor) -> float:
    """FBCache: ``sum |r_t - r_prev| / sum |r_prev|`` over all tensors (reduced sums)."""
    total = sums.view(-1, 2).sum(0)  # (n, 2) -> (2,)
    return float(total[0] / total[1]) if float(total[1]) > 0 else float("inf")


def mean_relative_change(sums: Tensor) -> float:
    """TeaCache-style: the mean over the tensors that changed (e.g. the hidden states and the timestep embedding; a
    text context or rotary angles that stay the same do not dilute it) of ``sum |x_t - x_prev| / sum |x_prev|``."""
    pairs = sums.view(-1, 2)  # (n, 2)
    changed = [d / p for d, p in pairs.tolist() if d > 0 and p > 0]
    return sum(changed) / len(changed) if changed else 0.0


class DecisionLink:
    """Carries each pass's decision from pipeline stage ``s`` to ``s + 1`` (see the module docstring)."""

    def __init__(self, link: StageLink) -> None:
        self.link = link
        self._pending: list[tuple[dist.Work, Tensor]] = []

    def send(self, skip: bool, device: torch.device) -> None:
        """Post the decision to the next stage (nothing on the last)."""
        if self.link.is_last:
            return
        flag = torch.tensor([1 if skip else 0], dtype=torch.uint8, device=device)  # (1,)
        work = dist.isend(flag, self.link.global_rank(self.link.stage + 1), group=self.link.group, tag=DECISION_TAG)
        self._pending.append((work, flag))

    def receive(self, device: torch.device) -> bool:
        """The decision of this pass from the previous stage, forwarded to the next one."""
        flag = torch.empty(1, dtype=torch.uint8, device=device)  # (1,)
        dist.recv(flag, self.link.global_rank(self.link.stage - 1), group=self.link.group, tag=DECISION_TAG)
        skip = bool(flag.item())
        self.send(skip, device)
        return skip

    def wait(self) -> None:
        """Wait for the posted sends (their buffers may then go)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def drop(self) -> None:
        """Forget the posted sends without waiting (after a failure)."""
        self._pending.clear()
