"""Exact micro-batch pipelining: the batch reaching the DiT is cut into micro-batches that flow through the stages.

Every rank runs the DiT's forward once per micro-batch. Stage ``s`` sends micro-batch ``i`` onward without
waiting for it to be received and goes on with micro-batch ``i + 1`` while stage ``s + 1`` works on ``i``.
The last stage runs the final layers, concatenates the micro-batch outputs and broadcasts them, so every
rank returns the whole batch's output.

Which arguments are cut: every tensor (also inside tuples, lists and dicts) whose dim 0 has the batch size,
the batch size being dim 0 of the forward's first argument (the latents), except the arguments whose dim 0
the plan declares a token dim (``split_inputs`` cutting dim 0, e.g. Flux's position ids of shape (S, 3): they
go whole even when S happens to equal the batch size). Other tensors and non-tensors go whole to every
micro-batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from lightning_dit_parallel.pipeline.comm import StageLink
from lightning_dit_parallel.pipeline.loop import StageDone, StageLoop
from lightning_dit_parallel.plan import Split, SplitSpec


class MicroBatchForward:
    """Replaces the DiT's ``forward`` (as an instance attribute) with the micro-batch schedule.

    Args:
        forward: the DiT's own forward (bound).
        loop: this rank's stage loop, installed on the DiT's block lists.
        link: this rank's place in the pipeline group.
        num_microbatches: micro-batches per call (capped at the batch size); ``None``: one per stage.
        token_inputs: the plan's ``split_inputs``: arguments cut along a token dim.
    """

    def __init__(
        self, forward: Callable, loop: StageLoop, link: StageLink, num_microbatches: int | None,
        token_inputs: Mapping[str, SplitSpec] | None = None,
    ) -> None:
        self.forward = forward
        self.__wrapped__ = forward  # inspect.signature(dit.forward) still shows the DiT's own arguments
        self.loop = loop
        self.link = link
        self.num_microbatches = num_microbatches or link.num_stages
        self.token_inputs = dict(token_inputs or {})
        self._signature = inspect.signature(forward)
        self._first_arg = next(iter(self._signature.parameters))

    def __call__(self, *args, **kwargs):
        latents = args[0] if args else kwargs.get(self._first_arg)
        if not isinstance(latents, Tensor) or latents.ndim == 0:
            raise TypeError(
                f"Micro-batch pipelining cuts the batch along dim 0 of the first forward argument"
                f" ({self._first_arg!r}), which must be a batched tensor; got {type(latents).__name__}."
            )
        batch = latents.shape[0]
        bound = self._signature.bind(*args, **kwargs)
        whole = {name: value for name, value in bound.arguments.items() if self._tokens_first(name, value)}
        batched = {name: value for name, value in bound.arguments.items() if name not in whole}
        outputs = []
        try:
            for chunk in split_batch(batched, batch, min(self.num_microbatches, batch)):
                self.loop.begin()
                bound.arguments.update(chunk)
                try:
                    outputs.append(self.forward(*bound.args, **bound.kwargs))
                except StageDone:
                    pass
        finally:
            self.loop.wait()
        merged = merge_batches(outputs) if self.link.is_last else None
        return self.link.broadcast_from_last(merged, latents.device)

    def _tokens_first(self, name: str, value) -> bool:
        """Whether the plan cuts argument ``name`` along its dim 0 as tokens (so dim 0 is not the batch)."""
        spec = self.token_inputs.get(name)
        specs, values = ((spec,), (value,)) if isinstance(spec, Split) else (spec or (), value)
        if not isinstance(values, (tuple, list)):
            return False
        return any(
            isinstance(s, Split) and isinstance(v, Tensor) and v.ndim >= 1 and s.dim % v.ndim == 0
            for s, v in zip(specs, values)
        )


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
