"""Install DistriFusion (displaced patch parallelism) on a DiT; ``remove()`` undoes it.

Every rank holds the whole model and computes its patch of the tokens through all layers: the plan's cuts and
gathers are sequence parallelism's (``sequence/parallelize.py``, with its padding, masks, per-call cuts, linear
attention, token grids and replicated tails, all exact); only the self-attention kernel differs
(``attention.py``: the previous step's keys and values of the other patches, gathered asynchronously). A forward
pre-hook counts the DiT calls of a batch (one per denoising step), which decides when the warm-up ends; the strategy
starts a new count at every ``predict_step`` (``begin_batch``), and a differently shaped call starts one too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.distrifusion.attention import StaleAttention
from lightning_dit_parallel.parallel.distrifusion.options import DistriFusionOptions
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import SequenceParallel, apply_sequence_parallel
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.utils.hooks import remove_handles


@dataclass
class DistriFusion:
    """DistriFusion installed on one DiT."""

    sequence: SequenceParallel
    attention: StaleAttention
    handles: list[RemovableHandle] = field(default_factory=list)
    _inputs_key: tuple | None = None

    def begin_batch(self) -> None:
        """A new batch: the next call is its first denoising step (exact during warm-up)."""
        self.attention.clear()
        self.attention.step = 0
        self._inputs_key = None

    def remove(self) -> None:
        remove_handles(self.handles)
        self.sequence.remove()
        self.begin_batch()  # waits for the gathers still travelling

    def discard(self) -> None:
        """``remove`` after a failure: the gathers still travelling are dropped, not waited for (a peer may be gone)."""
        remove_handles(self.handles)
        self.sequence.remove()
        self.attention.exchanges.clear()
        self.attention.step = 0
        self._inputs_key = None

    def _count_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        key = tuple((tuple(t.shape), t.dtype) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor))
        if key != self._inputs_key:  # a differently shaped call cannot continue the previous batch
            self.begin_batch()
            self._inputs_key = key
        self.attention.step += 1


def apply_distrifusion(
    model: nn.Module, plan: DiTPlan, groups: SequenceGroups, options: DistriFusionOptions
) -> DistriFusion:
    """Install the plan's cuts and gathers with DistriFusion's self-attention over ``groups`` (one axis).

    Raises:
        ValueError: for groups with both a Ulysses and a ring axis, and everything ``apply_sequence_parallel``
            rejects (checked before anything is installed, on every rank).
    """
    attention = StaleAttention(groups, options.warmup_steps)
    sequence = apply_sequence_parallel(model, plan, groups, attention=attention)
    installed = DistriFusion(sequence, attention)
    installed.handles.append(model.register_forward_pre_hook(installed._count_step, with_kwargs=True, prepend=True))
    return installed
