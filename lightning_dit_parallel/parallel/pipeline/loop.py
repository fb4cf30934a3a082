"""Running only this stage's blocks inside the DiT's own block loops, with transfers at the stage boundaries.

Installed on the plan's block ``ModuleList``s (their class is swapped for a subclass whose ``__iter__`` is
changed; ``remove`` swaps it back). When the DiT's forward iterates a block list, a rank sees:

* only the blocks its stage owns; the first one has a forward pre-hook that, on every stage but the first,
  replaces the tensors of the call that come from earlier blocks by those the previous stage sent;
* then, on every stage but the last, a ``_SendToNextStage`` placeholder where the next stage's first block
  would be called: it sends the tensors of that call that come from this stage's blocks and raises
  ``StageDone``, which ends this rank's part of the forward (the caller catches it).

The DiT's forward itself does everything between the blocks (embeddings, timestep embeddings, rotary, the
mapping of a block's outputs to the next block's inputs, the final layer), so this works for any family
with a plan. Which tensors of a boundary call are sent: all except those that are the very objects passed
to this rank's first block call (loop invariants such as the timestep embedding, rotary angles or the text
context, which the receiving stage computes itself from the same inputs).

A loop that counts its blocks with ``enumerate`` (ControlNet residuals read by position, Chroma's per-block
modulation) counts them from their position in the whole list: each view carries the position of its first item
(``positions.OFFSET_ATTRIBUTE``), which ``positions.stage_enumerate`` starts from.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.pipeline.comm import StageLink
from lightning_dit_parallel.parallel.pipeline.positions import OFFSET_ATTRIBUTE
from lightning_dit_parallel.parallel.pipeline.stages import StageAssignment
from lightning_dit_parallel.utils.hooks import remove_handles


class StageDone(Exception):
    """Raised on a stage that has sent its result onward: the rest of the DiT's forward is another stage's work."""


class StageLoop:
    """This rank's view of the block loops (see the module docstring). Call ``remove()`` to undo.

    Args:
        lists: the plan's block lists, in execution order (blocks of other stages already released).
        assignment: which blocks each stage owns.
        link: this rank's place in the pipeline group.
    """

    def __init__(self, lists: list[tuple[str, nn.ModuleList]], assignment: StageAssignment, link: StageLink) -> None:
        self.lists = lists
        self.assignment = assignment
        self.link = link
        owned = assignment.owned(link.stage)
        self._items: list[list[nn.Module]] = [[] for _ in lists]
        # the position, inside each list, of the first item this stage yields (0 for a list it yields nothing of)
        self._offsets: list[int | None] = [None for _ in lists]
        for block in owned:
            list_index, index = assignment.locate(block)
            self._items[list_index].append(lists[list_index][1][index])
            if self._offsets[list_index] is None:
                self._offsets[list_index] = index
        if not link.is_last:
            list_index, index = assignment.locate(owned.stop)
            self._items[list_index].append(_SendToNextStage(self))
            if self._offsets[list_index] is None:
                self._offsets[list_index] = index
        first_list, first_index = assignment.locate(owned.start)
        self._first_block = lists[first_list][1][first_index]
        last_list, last_index = assignment.locate(owned.stop - 1)
        self._last_block = lists[last_list][1][last_index]
        self.last_block_entered = False  # in this pass (PipeFusion gathers only after it)
        self._handles: list[RemovableHandle] = []
        self._classes: list[type] = []
        self.first_inputs: list[Tensor] = []
        self.pending: list[dist.Work] = []
        self._in_flight: list[list[Tensor]] = []

    def install(self) -> StageLoop:
        for list_index, (_, blocks) in enumerate(self.lists):
            self._classes.append(type(blocks))
            blocks.__class__ = _stage_blocks_class(type(blocks))
            blocks._pipeline_items = self._items[list_index]
            setattr(blocks, OFFSET_ATTRIBUTE, self._offsets[list_index] or 0)
        self._handles.append(self._first_block.register_forward_pre_hook(self._enter_stage, with_kwargs=True))
        self._handles.append(self._last_block.register_forward_pre_hook(self._enter_last_block))
        return self

    def remove(self, wait: bool = True) -> None:
        """Take the hooks off; ``wait=False`` (after a failure) drops the posted sends instead of waiting for them."""
        remove_handles(self._handles)
        for (_, blocks), cls in zip(self.lists, self._classes):
            blocks.__class__ = cls
            del blocks._pipeline_items
            delattr(blocks, OFFSET_ATTRIBUTE)
        self._classes.clear()
        if wait:
            self.wait()
        self.pending.clear()
        self._in_flight.clear()

    def begin(self) -> None:
        """Start one pass (a micro-batch or a patch) through the DiT's forward."""
        self.first_inputs = []
        self.last_block_entered = False

    def wait(self) -> None:
        """Wait until every posted send has completed (then its tensors may be freed)."""
        for work in self.pending:
            work.wait()
        self.pending.clear()
        self._in_flight.clear()

    def _enter_stage(self, module: nn.Module, args: tuple, kwargs: dict):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        self.first_inputs = [leaves[i] for i in positions]
        if self.link.is_first:
            return None
        received = self.link.recv(self.first_inputs)
        for i, tensor in zip(positions, received):
            leaves[i] = tensor
        return pytree.tree_unflatten(leaves, spec)

    def _enter_last_block(self, module: nn.Module, args: tuple) -> None:
        self.last_block_entered = True

    def _send(self, args: tuple, kwargs: dict) -> None:
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)]
        if not tensors:
            raise RuntimeError("The next stage's first block is called without any tensor; nothing to pipeline.")
        mask = [not any(t is f for f in self.first_inputs) for t in tensors]
        works, buffers = self.link.send(tensors, mask)
        self.pending.extend(works)
        self._in_flight.append(buffers)  # keep the buffers alive until the sends complete


class _SendToNextStage(nn.Module):
    """Called by the DiT's loop in place of the next stage's first block: sends, then ends this stage's pass."""

    def __init__(self, loop: StageLoop) -> None:
        super().__init__()
        self._loop = [loop]  # a list, so that the loop is not registered as a submodule

    def forward(self, *args, **kwargs):
        self._loop[0]._send(args, kwargs)
        raise StageDone


_CLASSES: dict[type, type] = {}


def _stage_blocks_class(base: type) -> type:
    """A subclass of the block list's class whose iteration yields ``_pipeline_items``."""
    if base not in _CLASSES:

        def __iter__(self):
            return iter(self._pipeline_items)

        _CLASSES[base] = type(f"Stage{base.__name__}", (base,), {"__iter__": __iter__})
    return _CLASSES[base]
