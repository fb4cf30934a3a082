"""Install pipeline parallelism on a DiT following its plan; ``remove()`` undoes the hooks.

Steps, all on every rank of the pipeline group: check everything (pure computation, so a bad
configuration raises the same ``ValueError`` everywhere before any communication), release the blocks of
other stages, install the stage loop on the block lists, and replace the DiT's ``forward`` (an instance
attribute over the class's forward, which itself is not changed) by the micro-batch or PipeFusion schedule.
``remove()`` undoes all of it: the released blocks come back with their weights broadcast from their stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from lightning_dit_parallel.parallel.incomplete import mark_incomplete
from lightning_dit_parallel.parallel.pipeline.comm import StageLink
from lightning_dit_parallel.parallel.pipeline.loop import StageLoop
from lightning_dit_parallel.parallel.pipeline.microbatch import MicroBatchForward
from lightning_dit_parallel.parallel.pipeline.options import DEFAULT_TEXT_TOKENS, PipelineOptions
from lightning_dit_parallel.parallel.pipeline.patch_attention import PatchAttention
from lightning_dit_parallel.parallel.pipeline.pipefusion import PipeFusionForward, check_pipefusion_plan
from lightning_dit_parallel.parallel.pipeline.positions import GlobalPositions
from lightning_dit_parallel.parallel.pipeline.positions import install as install_global_positions
from lightning_dit_parallel.parallel.pipeline.stages import (
    StageAssignment,
    assign_stages,
    check_cuts_on_every_stage,
    put_back_released,
    release_blocks,
    restore_blocks,
)
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.parallelize import apply_sequence_parallel
from lightning_dit_parallel.plan import DiTPlan, module_paths

_MISSING = object()


@dataclass
class PipelineParallel:
    """Pipeline parallelism installed on one DiT.

    While installed, the blocks of other stages are released (their memory is freed, which is the point).
    ``remove()`` takes the hooks and the forward replacement away and puts the released blocks back, their
    weights broadcast from the stages that own them (a collective over the pipeline group): the DiT is the
    plain, whole model again on every rank, for a plain forward or another strategy.
    """

    model: nn.Module
    plan: DiTPlan
    assignment: StageAssignment
    released: list[str]
    loop: StageLoop
    driver: MicroBatchForward | PipeFusionForward
    positions: GlobalPositions
    previous_forward: object = _MISSING
    removed: bool = field(default=False)

    @property
    def stage(self) -> int:
        """This rank's pipeline stage."""
        return self.loop.link.stage

    def begin_batch(self) -> None:
        """A new batch starts (PipeFusion forgets its key/value caches and its step count)."""
        if isinstance(self.driver, PipeFusionForward):
            self.driver.begin_batch()

    def remove(self) -> None:
        if self.removed:
            return
        self._remove_hooks()
        try:
            restore_blocks(self.model, self.plan, self.assignment, self.loop.link.group)
        except BaseException:
            self.discard()  # a peer is gone: the blocks not yet received stay meta tensors
            raise

    def discard(self) -> None:
        """Undo the pipeline without a collective (after a failed predict, see ``incomplete.py``): the released
        blocks come back with their meta tensors and the model is marked incomplete."""
        self._remove_hooks(wait=False)
        if put_back_released(self.model, self.plan):
            mark_incomplete(
                self.model,
                "the blocks of other pipeline stages could not be received back (no collective after the failure).",
            )

    def _remove_hooks(self, wait: bool = True) -> None:
        if self.removed:
            return
        if isinstance(self.driver, PipeFusionForward):
            self.driver.remove()
        self.loop.remove(wait)
        self.positions.remove()
        if self.previous_forward is _MISSING:
            del self.model.forward
        else:
            self.model.forward = self.previous_forward
        self.removed = True


def apply_pipeline(
    model: nn.Module,
    plan: DiTPlan,
    options: PipelineOptions,
    group: ProcessGroup,
    sequence: SequenceGroups | None = None,
) -> PipelineParallel:
    """Cut ``model``'s blocks into ``group``'s size of stages and pipeline its forward.

    Args:
        model: the DiT (a module whose class has a plan).
        plan: its plan; ``plan.blocks`` gives the block lists, the split/gather points are used by PipeFusion.
        options: mode, patches, warm-up steps, layers per stage, micro-batches.
        group: the pipeline group (the ``pp`` axis of the mesh); stage = rank in this group.
        sequence: PipeFusion only: the sequence-parallel groups of this rank's stage (each pass's patch is sharded
            over them, see ``pipefusion.py``); ``None``: one rank per stage. Micro-batch pipelining composes with
            sequence parallelism installed separately (``parallelize``).

    Raises:
        ValueError: for a plan whose blocks cannot be staged (``pipeline_unsupported``), more stages than blocks,
            ``layers_per_stage`` that do not fit, a ``shared_modules``
            entry that is not inside a block, or PipeFusion on a plan it does not
            support (see ``check_pipefusion_plan``; for a cut at a block's inputs every stage must own a block of
            that list from there on).
    """
    if plan.pipeline_unsupported:
        raise ValueError(
            f"{type(model).__name__} cannot be cut into pipeline stages: {plan.pipeline_unsupported} Use pp_degree=1"
            " for this model."
        )
    stages = dist.get_world_size(group)
    options.check_stages(stages)
    assignment = assign_stages(model, plan, stages, options.layers_per_stage)
    if sequence is not None and options.mode != "pipefusion":
        raise ValueError(f"apply_pipeline takes sequence groups for PipeFusion only ({options.describe()}).")
    modules = dict(model.named_modules())
    missing = [p for p in plan.split_module_inputs if p not in modules]
    missing += [p for p in (*plan.split_outputs, *plan.gather_outputs) if not module_paths(modules, p)]
    if missing:
        raise ValueError(f"Plan module paths {missing} do not exist in {type(model).__name__}.")
    groups = sequence or SequenceGroups()
    if options.mode == "pipefusion":
        check_pipefusion_plan(plan, model)
        check_cuts_on_every_stage(model, plan, assignment, f"PipeFusion (pp={stages})")
        # the hooks' own checks (paths, patterns, arguments, heads) on the whole model, before anything is released
        apply_sequence_parallel(model, plan, groups, per_forward=False).remove()
    link = StageLink.from_group(group)

    released = release_blocks(model, plan, assignment, link.stage)
    loop = StageLoop(plan.block_lists(model), assignment, link).install()
    previous = model.__dict__.get("forward", _MISSING)
    forward = model.forward
    if options.mode == "microbatch":
        driver: MicroBatchForward | PipeFusionForward = MicroBatchForward(
            forward, loop, link, options.num_microbatches, plan.split_inputs
        )
    else:
        attention = PatchAttention(groups)
        hooks = apply_sequence_parallel(model, plan, groups, attention=attention, per_forward=False)
        driver = PipeFusionForward(
            forward,
            model,
            plan,
            loop,
            link,
            hooks,
            attention,
            options.num_patches or stages,
            options.warmup_steps,
            options.text_tokens or DEFAULT_TEXT_TOKENS,
        )
    model.forward = driver
    positions = install_global_positions(model)  # enumerate(blocks) counts a stage's blocks from their position
    return PipelineParallel(model, plan, assignment, released, loop, driver, positions, previous)
