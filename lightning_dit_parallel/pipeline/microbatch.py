"""Exact micro-batch pipelining: the batch reaching the DiT is cut into micro-batches that flow through the stages.

Every rank runs the DiT's forward once per micro-batch. Stage ``s`` sends micro-batch ``i`` onward without
waiting for it to be received and goes on with micro-batch ``i + 1`` while stage ``s + 1`` works on ``i``.
The last stage runs the final layers, concatenates the micro-batch outputs and broadcasts them, so every
rank returns the whole batch's output.

Which arguments are cut: every tensor (also inside tuples, lists and dicts) whose dim 0 has the batch size,
the batch size being dim 0 of the forward's first argument (the latents). Other tensors (e.g. Flux's
position ids, shape (S, 3)) and non-tensors go whole to every micro-batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from lightning_dit_parallel.pipeline.comm import StageLink
from lightning_dit_parallel.pipeline.loop import StageDone, StageLoop


class MicroBatchForward:
    """Replaces the DiT's ``forward`` (as an instance attribute) with the micro-batch schedule.

    Args:
        forward: the DiT's own forward (bound).
        loop: this rank's stage loop, installed on the DiT's block lists.
        link: this rank's place in the pipeline group.
        num_microbatches: micro-batches per call (capped at the batch size); ``None``: one per stage.
    """

    def __init__(self, forward: Callable, loop: StageLoop, link: StageLink, num_microbatches: int | None) -> None:
        self.forward = forward
        self.loop = loop
        self.link = link
        self.num_microbatches = num_microbatches or link.num_stages
        self._first_arg = next(iter(inspect.signature(forward).parameters))

    def __call__(self, *args, **kwargs):
        latents = args[0] if args else kwargs.get(self._first_arg)
        if not isinstance(latents, Tensor) or latents.ndim == 0:
            raise TypeError(
                f"Micro-batch pipelining cuts the batch along dim 0 of the first forward argument"
                f" ({self._first_arg!r}), which must be a batched tensor; got {type(latents).__name__}."
            )
        batch = latents.shape[0]
        chunks = split_batch((args, kwargs), batch, min(self.num_microbatches, batch))
        outputs = []
        try:
            for chunk_args, chunk_kwargs in chunks:
                self.loop.begin()
                try:
                    outputs.append(self.forward(*chunk_args, **chunk_kwargs))
                except StageDone:
                    pass
        finally:
            self.loop.wait()
        merged = merge_batches(outputs) if self.link.is_last else None
        return self.link.broadcast_from_last(merged, latents.device)


def split_batch(inputs, batch: int, parts: int) -> list:
    """Cut every tensor leaf of ``inputs`` whose dim 0 is ``batch`` into ``parts`` micro-batches.

    (B, ...) -> parts x (about B/parts, ...); other leaves are repeated in every micro-batch.
    """
    leaves, spec = pytree.tree_flatten(inputs)
    pieces = [
        leaf.tensor_split(parts) if isinstance(leaf, Tensor) and leaf.ndim >= 1 and leaf.shape[0] == batch else None
        for leaf in leaves
    ]
    return [
        pytree.tree_unflatten([leaf if piece is None else piece[i] for leaf, piece in zip(leaves, pieces)], spec)
        for i in range(parts)
    ]


def merge_batches(outputs: list):
    """Concatenate the micro-batch outputs leaf by leaf along dim 0: parts x (b, ...) -> (B, ...)."""
    flat = [pytree.tree_flatten(out) for out in outputs]
    spec = flat[0][1]
    merged = [
        torch.cat(group) if isinstance(group[0], Tensor) and group[0].ndim >= 1 else group[0]
        for group in zip(*(leaves for leaves, _ in flat))
    ]
    return pytree.tree_unflatten(merged, spec)
