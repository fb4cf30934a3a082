"""Exact micro-batch pipelining: the batch reaching the DiT is cut into micro-batches that flow through the stages.

Every rank runs the DiT's forward once per micro-batch. Stage ``s`` sends micro-batch ``i`` onward without
waiting for it to be received and goes on with micro-batch ``i + 1`` while stage ``s + 1`` works on ``i``.
The last stage runs the final layers, concatenates the micro-batch outputs and broadcasts them, so every
rank returns the whole batch's output.

Which arguments are cut: the batch tensors as CFG parallel finds them (see ``lightning_dit_parallel.parallel.batch``),
the batch size being dim 0 of the forward's first argument (the latents). Tensors whose dim 0 the plan declares
a token dim (``split_inputs`` cutting dim 0, e.g. Flux's position ids of shape (S, 3)) go whole even when S
happens to equal the batch size; other tensors and non-tensors go whole to every micro-batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from lightning_dit_parallel.parallel.batch import map_batch
from lightning_dit_parallel.parallel.pipeline.comm import StageLink
from lightning_dit_parallel.parallel.pipeline.loop import StageDone, StageLoop
from lightning_dit_parallel.plan import SplitSpec


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
        self,
        forward: Callable,
        loop: StageLoop,
        link: StageLink,
        num_microbatches: int | None,
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
        arguments = dict(bound.arguments)
        parts = min(self.num_microbatches, batch)
        outputs = []
        try:
            for index in range(parts):
                self.loop.begin()
                bound.arguments.update(microbatch_arguments(arguments, batch, parts, index, self.token_inputs))
                try:
                    outputs.append(self.forward(*bound.args, **bound.kwargs))
                except StageDone:
                    pass
        finally:
            self.loop.wait()
        merged = merge_batches(outputs) if self.link.is_last else None
        return self.link.broadcast_from_last(merged, latents.device)


def microbatch_arguments(
    arguments: Mapping[str, Any], batch: int, parts: int, index: int, token_inputs: Mapping[str, SplitSpec]
) -> dict[str, Any]:
    """Micro-batch ``index`` of ``parts`` of the forward arguments: batch tensors (B, ...) -> (about B/parts, ...).

    ``token_inputs``: the plan's ``split_inputs``, so that a tensor whose dim 0 holds tokens is not taken for a batch.
    """
    return {
        name: map_batch(value, batch, token_inputs.get(name), lambda x: x.tensor_split(parts)[index])
        for name, value in arguments.items()
    }


def merge_batches(outputs: list):
    """Concatenate the micro-batch outputs leaf by leaf along dim 0: parts x (b, ...) -> (B, ...)."""
    flat = [pytree.tree_flatten(out) for out in outputs]
    spec = flat[0][1]
    merged = [
        # parts x (b, ...) -> (B, ...)
        torch.cat(group) if isinstance(group[0], Tensor) and group[0].ndim >= 1 else group[0]
        for group in zip(*(leaves for leaves, _ in flat))
    ]
    return pytree.tree_unflatten(merged, spec)
