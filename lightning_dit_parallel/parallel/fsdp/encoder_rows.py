"""A sharded encoder's batch split over the ranks that encode the same prompts: each computes its rows, then all
gather the outputs.

The ranks of one model-parallel group (cfg, pp, ring, ulysses, tp: ``mesh.ENCODER_AXES``) call a pipeline's text and
image encoders with the same inputs at the same time, and FSDP already makes them run every layer in step. Left
alone, each of them computes every prompt: the same work N times, and the same activations on every rank (T5's
attention scores over 512 tokens are the largest tensors of a text encode). ``EncoderRows`` cuts the batch instead:
with ``B`` rows and ``N`` ranks, rank ``r`` computes rows ``[r * R, (r + 1) * R)`` of the batch padded to ``N * R``
rows (``R = ceil(B / N)``; padding repeats the last row), and every tensor of the output is all-gathered back to
``B`` rows. Rows of an encoder never mix (no batch statistics in inference), so every rank returns what one process
computes; a rank's encode activations and time become ``1/N``.

What is cut: every tensor argument whose dim 0 is the batch (that of the first tensor argument: ``input_ids``,
``attention_mask``, ``pixel_values``); other arguments go as they are. A batch of one row is not cut. The ranks first
agree on the batch size (one small all-gather): ranks called with different batches raise the same ``ValueError``
instead of waiting in a mismatched collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.utils.hooks import remove_handles


@dataclass
class EncoderRows:
    """The batch split installed on one encoder (hooks on its forward); ``remove()`` takes it away.

    Attributes:
        module: the encoder.
        group: the ranks that call it with the same inputs.
    """

    module: nn.Module
    group: ProcessGroup
    handles: list[RemovableHandle] = field(default_factory=list)
    batches: list[tuple[int, int] | None] = field(default_factory=list)  # per running call: (batch, rows per rank)

    def install(self) -> EncoderRows:
        self.handles.append(self.module.register_forward_pre_hook(self._cut, with_kwargs=True))
        self.handles.append(self.module.register_forward_hook(self._gather, always_call=True))
        return self

    def remove(self) -> None:
        remove_handles(self.handles)
        self.batches.clear()

    def _cut(self, module: nn.Module, args: tuple, kwargs: dict):
        first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.ndim > 0), None)
        batch = None if first is None else _agreed_batch(first, self.group, type(module).__name__)
        if batch is None:
            self.batches.append(None)
            return None
        n, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        rows = -(-batch // n)
        # this rank's rows of the batch padded to n * rows (the last row repeated): (batch, ...) -> (rows, ...)
        index = torch.arange(rank * rows, (rank + 1) * rows, device=first.device).clamp_(max=batch - 1)
        self.batches.append((batch, rows))
        return pytree.tree_map(
            lambda t: t.index_select(0, index.to(t.device)) if _is_batched(t, batch) else t, (args, kwargs)
        )

    def _gather(self, module: nn.Module, args: tuple, output):
        cut = self.batches.pop() if self.batches else None
        if cut is None or output is None:  # not cut, or the forward raised (``always_call``)
            return None
        batch, rows = cut
        n = dist.get_world_size(self.group)
        leaves, spec = pytree.tree_flatten(output)
        odd = [tuple(t.shape) for t in leaves if isinstance(t, Tensor) and not _is_batched(t, rows)]
        if odd:  # the same outputs on every rank: every rank raises here, none waits in a gather
            raise ValueError(
                f"{type(module).__name__}: its batch was split over {n} ranks ({rows} of {batch} rows each), but it"
                f" returned tensors without a batch dim {odd}; such an encoder cannot be split. Leave it unsharded"
                " (shard_modules without it)."
            )
        gathered = []
        with torch.no_grad():  # inference: the gathered outputs carry no autograd history
            for leaf in leaves:
                if isinstance(leaf, Tensor):
                    whole = leaf.new_empty((n * rows, *leaf.shape[1:]))
                    # (rows, ...) per rank -> all-gather -> (n * rows, ...) in rank order -> the first `batch` rows
                    dist.all_gather_into_tensor(whole, leaf.detach().contiguous(), group=self.group)
                    leaf = whole if n * rows == batch else whole[:batch].clone()  # padding dropped; not a view
                gathered.append(leaf)
        return pytree.tree_unflatten(gathered, spec)


def _is_batched(t: object, batch: int) -> bool:
    return isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == batch


def _agreed_batch(first: Tensor, group: ProcessGroup, name: str) -> int | None:
    """The batch every rank of ``group`` was called with (one all-gather of the sizes, on the argument's device), or
    ``None`` for a batch of one row (nothing to cut).

    Raises:
        ValueError: on every rank, when the ranks were called with different batch sizes.
    """
    mine = torch.tensor([first.shape[0]], device=first.device)
    sizes = torch.empty(dist.get_world_size(group), dtype=mine.dtype, device=first.device)
    dist.all_gather_into_tensor(sizes, mine, group=group)  # (1,) per rank -> (N,)
    sizes_list = sizes.tolist()
    if len(set(sizes_list)) != 1:
        raise ValueError(
            f"{name}: the ranks that encode the same prompts were called with batches {sizes_list}; they must call"
            " their sharded encoders with the same inputs."
        )
    batch = sizes_list[0]
    return batch if batch > 1 else None


def apply_encoder_rows(module: nn.Module, group: ProcessGroup) -> EncoderRows:
    """Split ``module``'s batch over ``group`` (see the module docstring); ``remove()`` undoes it."""
    return EncoderRows(module, group).install()
