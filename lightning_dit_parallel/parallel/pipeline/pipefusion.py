"""PipeFusion: the token sequence is cut into patches that flow through the pipeline stages (approximate).

Per DiT call (one denoising step) every rank runs the DiT's forward once per patch. The plan's cut points, the same
hooks as sequence parallelism's (``sequence/parallelize.py``), cut every sequence to this pass's part
(``patches.py``): the image or video tokens (every sequence the plan gathers) to the current patch, the text of
joint attention either to its patch too (``text_tokens="per_step"``: each text token computed once per step) or
whole with every patch (``"every_patch"``: the text recomputed with every patch, as fresh as it gets). The block
loop runs this stage's blocks (``loop.py``); on the last stage the plan's gather points collect the patches and, at
the last patch, return the whole sequences so the rest of the forward (unpatchify) runs on real data.

Attention (``patch_attention.py``): each self-attention module of a stage keeps the keys and values of every token
from its previous calls, overwrites this pass's rows with the fresh ones and attends over all of them, so a patch
sees the current step's keys for the patches already computed and the previous step's for the others. Keys never
computed yet (no warm-up) are masked out. The first ``warmup_steps`` calls of a batch run unpatched, which is exact
and fills the caches. The state lives with the module's owner and is reset for each new batch, so any number of
steps runs on any number of stages.

With sequence parallelism (``ulysses``/``ring`` > 1), every stage is a sequence-parallel group: each rank of it
holds the padded shard of the pass's part (``PatchedSharding``); attention is Ulysses over the pass with the keys
and values all-gathered over the ring axis into the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from lightning_dit_parallel.parallel.pipeline.comm import StageLink
from lightning_dit_parallel.parallel.pipeline.loop import StageDone, StageLoop
from lightning_dit_parallel.parallel.pipeline.options import DEFAULT_TEXT_TOKENS, TextTokens
from lightning_dit_parallel.parallel.pipeline.patch_attention import PatchAttention
from lightning_dit_parallel.parallel.pipeline.patches import PatchedSharding, PatchPass
from lightning_dit_parallel.parallel.sequence.parallelize import SequenceParallel
from lightning_dit_parallel.plan import DiTPlan, Split


@dataclass
class PatchCollector:
    """Collects, on the last stage, the patches that the plan's gather points see in the passes of one step.

    A gather point returns the whole sequence at the last pass (the patches in order). In an earlier pass, once every
    sequence the plan gathers has been collected, the pass ends (``StageDone``: the rest of the forward needs whole
    sequences); a gather point reached before that returns its sequence with the patches still missing as zeros, so
    the forward can go on to the next one.

    Args:
        loop: this rank's stage loop (a gather point must run after the stage's last block).
        gathered: the sequences the plan gathers.
    """

    loop: StageLoop
    gathered: frozenset[str]
    patch: PatchPass = field(default_factory=lambda: PatchPass(1, 0))
    parts: dict[str, list[Tensor]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    def begin_pass(self, patch: PatchPass) -> None:
        self.patch = patch
        self.done = set()
        if patch.index == 0:
            self.parts.clear()

    def check(self, split: Split, where: str) -> None:
        """A gather point runs on the last stage after its last block; anywhere else the patches are not complete.

        Raises:
            ValueError: for a gather before the last stage's blocks ran (e.g. a refiner whose output the plan gathers
                before the main blocks), on every rank at the same point of the first forward.
        """
        if not (self.loop.link.is_last and self.loop.last_block_entered):
            raise ValueError(
                f"PipeFusion cannot run this plan: it gathers {split.sequence!r} at {where!r} before the blocks of the"
                " last pipeline stage ran (a sequence gathered, then cut again, e.g. a refiner before the main"
                " blocks); PipeFusion's patches flow through all blocks before they are gathered. Use pipeline mode"
                " 'microbatch' for this model."
            )

    def __call__(self, part: Tensor, split: Split, where: str) -> Tensor:
        dim = split.dim % part.ndim
        parts = self.parts.setdefault(where, [])
        parts.append(part)  # (..., S_i, ...)
        self.done.add(split.sequence)
        patch = self.patch
        if patch.index == patch.patches - 1:
            self.parts.pop(where)
            return torch.cat(parts, dim=dim) if len(parts) > 1 else part  # M x (..., S_i, ...) -> (..., S, ...)
        if self.gathered <= self.done:
            raise StageDone  # every gathered sequence collected: the rest of this pass is not needed
        missing = patch.parts(split.sequence)[len(parts) :]
        zeros = [part.new_zeros((*part.shape[:dim], size, *part.shape[dim + 1 :])) for size in missing]
        return torch.cat([*parts, *zeros], dim=dim)  # (..., S, ...) with the later patches still zero


@dataclass
class PipeFusionForward:
    """Replaces the DiT's ``forward`` (as an instance attribute) with the PipeFusion schedule.

    Args:
        forward: the DiT's own forward (bound).
        model: the DiT.
        plan: its plan.
        loop: this rank's stage loop, installed on the DiT's block lists.
        link: this rank's place in the pipeline group.
        sequence: the plan's cut and gather hooks, installed without a per-forward state (each pass starts one).
        attention: the self-attention kernels and their key/value caches.
        num_patches: patches per step after warm-up.
        warmup_steps: unpatched calls at the start of each batch.
        text_tokens: what the sequences that the plan does not gather do (``TextTokens``).
    """

    forward: Callable
    model: nn.Module
    plan: DiTPlan
    loop: StageLoop
    link: StageLink
    sequence: SequenceParallel
    attention: PatchAttention
    num_patches: int
    warmup_steps: int
    text_tokens: TextTokens = DEFAULT_TEXT_TOKENS
    step: int = 0
    _inputs_key: tuple | None = None

    def __post_init__(self) -> None:
        self.__wrapped__ = self.forward  # inspect.signature(dit.forward) still shows the DiT's own arguments
        self.gathered = frozenset(split.sequence for split in self.plan.gather_outputs.values())
        self.collector = PatchCollector(self.loop, self.gathered)

    def begin_batch(self) -> None:
        """Forget the caches and the step count: the next call is the first step of a new batch."""
        self.attention.clear()
        self.step = 0
        self._inputs_key = None

    def __call__(self, *args, **kwargs):
        key = _inputs_key((args, kwargs))
        if key != self._inputs_key:  # a differently shaped call cannot continue the previous batch
            self.begin_batch()
            self._inputs_key = key
        patches = 1 if self.step < self.warmup_steps else self.num_patches
        self.step += 1
        patched = self.gathered if self.text_tokens == "every_patch" else None
        result = None
        try:
            for index in range(patches):
                patch = PatchPass(patches, index, patched)
                state = PatchedSharding(
                    self.sequence.groups, patch=patch, collect=self.collector, check_gather=self.collector.check
                )
                self.collector.begin_pass(patch)
                self.loop.begin()
                cut_args, cut_kwargs = self.sequence.begin(state, args, kwargs)
                try:
                    result = self.forward(*cut_args, **cut_kwargs)
                except StageDone:
                    pass
                finally:
                    self.sequence.end()
        finally:
            self.loop.wait()
        device = next(leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)).device
        return self.link.broadcast_from_last(result if self.link.is_last else None, device)

    def remove(self) -> None:
        self.sequence.remove()
        self.begin_batch()


def check_pipefusion_plan(plan: DiTPlan, model: nn.Module) -> None:
    """PipeFusion cuts every sequence of the plan into patches; what it cannot apply to a patch is an error.

    Pure computation: every rank of the pipeline reaches the same verdict before any communication. (Where the plan
    cuts tokens at a block's inputs, every stage must own a block of that list from there on:
    ``stages.check_cuts_on_every_stage``; a plan that gathers a sequence before the last stage's blocks is found at
    the first forward, see ``PatchCollector.check``.)

    Raises:
        ValueError: for plans with linear attention or token grids (sums over all tokens, convolutions over the token
            grid), replicated-tail attention (a tail whose length is only known at the call) or gathered module
            inputs (a module that needs a whole cut sequence in the middle of the blocks).
    """
    not_applied = [
        name
        for name in (
            "linear_attention",
            "token_grids",
            "replicated_tail_attention",
            "gather_module_inputs",
            "head_parallel_attention",
        )
        if getattr(plan, name)
    ]
    if not_applied:
        raise ValueError(
            f"PipeFusion does not support the plan of {type(model).__name__}: it has {not_applied} (sums over all"
            " tokens, convolutions over the token grid, attention to a tail of replicated tokens, or a module that"
            " needs a whole cut sequence inside the blocks), which PipeFusion does not apply to patches. Use pipeline"
            " mode 'microbatch' for this model."
        )


def _inputs_key(inputs) -> tuple:
    return tuple((tuple(leaf.shape), leaf.dtype) for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, Tensor))
