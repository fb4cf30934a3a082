"""``fsdp_units="rows"``: an FSDP-sharded ``nn.Linear`` computed one rank's rows at a time, never gathered whole.

FSDP2 shards a Linear unit's weight ``(out, in)`` and bias ``(out,)`` along dim 0: rank ``r`` holds rows
``torch.chunk``'s ``r``-th piece. Gathering the whole matrix for its forward costs twice the matrix on top of the
shards (FSDP2's all-gather buffer and the parameter it is copied into). Here the ranks instead take turns: rank ``r``
broadcasts its rows to the shard group, every rank multiplies *its own* input by them and writes the output columns
those rows make, then frees them. A rank holds its own rows plus at most two other ranks' at a time (the
next rank's rows travel while the current ones are multiplied: ``2/N`` of the matrix, not ``2x``); the bytes each rank
receives are the all-gather's (``(N - 1)/N`` of the matrix), in ``N`` broadcasts; each output element is the same dot
product as the whole layer's. The inputs may differ between the ranks (the data-parallel ranks of an FSDP group pass
different prompts): only weights travel.

The unit's FSDP2 forward hooks (its all-gather and free) are made inert while this is installed and the Linear's
``forward`` is replaced by an instance attribute; ``remove()`` puts both back (then FSDP2's own ``remove`` gathers the
weights whole once, at teardown). Each Linear's first piece of rows is waited for: the overlap is within a layer, not
across layers as FSDP2's prefetched all-gathers (``fsdp_units="layers"``) on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_dit_parallel.parallel.rows import row_counts
from lightning_dit_parallel.utils.hooks import WeightHooks, inert_hook


def streams_rows(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.Linear`` (its class's forward is torch's), which rows streaming computes."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class RowStreamedLinear:
    """One FSDP2 Linear unit computed by rows streaming (see the module docstring); ``remove()`` undoes it.

    Args:
        linear: an ``nn.Linear`` that ``fully_shard`` made a unit of its own (its parameters Shard(0) DTensors).
        group: the unit's shard group.
        hooks: the unit's FSDP2 pre- and post-forward hooks (``FSDPSharding.weight_hooks``).
    """

    def __init__(self, linear: nn.Linear, group: ProcessGroup, hooks: WeightHooks) -> None:
        self.linear = linear
        self.group = group
        self.hooks = hooks
        self._replaced: list[tuple[dict, int, Callable]] = []  # (hook dict, hook id, FSDP2's hook)
        self.counts = row_counts(linear.out_features, group.size())  # rows of each rank
        self.starts = [sum(self.counts[:r]) for r in range(len(self.counts))]  # its first output column

    def install(self) -> RowStreamedLinear:
        for handle in (self.hooks.pre, self.hooks.post):
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks:
                self._replaced.append((hooks, handle.id, hooks[handle.id]))
                hooks[handle.id] = inert_hook  # nothing to gather, nothing to free
        self.linear.forward = self.forward
        return self

    def remove(self) -> None:
        for hooks, key, original in self._replaced:
            if hooks.get(key) is inert_hook:
                hooks[key] = original
        self._replaced.clear()
        self.linear.__dict__.pop("forward", None)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        local_weight = weight.to_local().to(x.device)  # (rows of this rank, in); a host-offloaded shard comes over
        local_bias = None if bias is None else bias.to_local().to(x.device)  # (rows of this rank,)
        me, counts, starts = self.group.rank(), self.counts, self.starts
        ranks = [r for r, count in enumerate(counts) if count > 0]  # ranks past the last piece hold no rows
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # (..., out)

        def post(rank: int) -> tuple[Tensor, Tensor | None, list]:
            """Start rank ``rank``'s broadcast of its rows (and bias); every rank posts them in the same order."""
            rows = local_weight if rank == me else local_weight.new_empty(counts[rank], weight.shape[1])
            rows_bias = None if bias is None else local_bias if rank == me else local_bias.new_empty(counts[rank])
            tensors = [t for t in (rows, rows_bias) if t is not None]
            works = [dist.broadcast(t, group=self.group, group_src=rank, async_op=True) for t in tensors]
            return rows, rows_bias, works

        # the next rank's rows travel while the current ones are multiplied: two pieces received at a time at most
        pending = post(ranks[0]) if ranks else None
        for i, rank in enumerate(ranks):
            rows, rows_bias, works = pending
            for work in works:
                work.wait()
            pending = post(ranks[i + 1]) if i + 1 < len(ranks) else None
            out[..., starts[rank] : starts[rank] + counts[rank]] = F.linear(x, rows, rows_bias)  # its output columns
            del rows, rows_bias
        return out


def apply_row_streaming(
    linears: list[nn.Module], group: ProcessGroup, weight_hooks: Callable[[nn.Module], list[WeightHooks]]
) -> list[RowStreamedLinear]:
    """Rows streaming on every plain ``nn.Linear`` of ``linears`` (FSDP2 units of their own); the installed ones."""
    installed: list[RowStreamedLinear] = []
    for module in linears:
        hooks = weight_hooks(module)
        if streams_rows(module) and hooks:
            installed.append(RowStreamedLinear(module, group, hooks[0]).install())
    return installed
