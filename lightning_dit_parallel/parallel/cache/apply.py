"""``apply_step_cache``: install step caching on a DiT, after the other parallelizers, with the group that decides.

Which ranks decide together (``decision_group``): the ranks of this rank's data-parallel index and pipeline stage on
the ``cfg``, ``ring``, ``ulysses`` and ``tp`` axes. Sequence-parallel and tensor-parallel ranks must take the same
branch (the collectives inside the blocks would otherwise not pair up); the two CFG halves decide jointly too, as the
one-process run decides on the doubled batch, so that the output equals it. Pipeline stages take the first stage's
decision (``decision.DecisionLink``). Data-parallel groups decide on their own samples, except with FSDP: then every
rank of the FSDP group (``fsdp.SHARD_AXES``, the dp axis included) decides together, because a skipped block does not
run its submodules, and FSDP units inside a block (the plan's shared modules, ``fsdp_units="layers"``) all-gather in
their own forward; the decision is then the one-process run's on all the group's samples as one batch. All ranks of
an FSDP group then skip the same blocks, so a skipped block's all-gather is left out on all of them
(``weight_gate.py``).

CFG parallel with separate calls (``CFGParallel.separate_calls``: cfg rank 0 computes each step's conditional call,
rank 1 the unconditional one) decides over the group without the cfg axis: each rank's call decides alone (with its
sequence / tensor-parallel ranks), as each diffusers cache context ("cond", "uncond") does in one process. In the
first step of a batch, where the call pattern is learned, both ranks compute both calls; those steps are warm-up
steps of the cache (always computed, no statistic reduced).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lightning_dit_parallel.parallel.cache.decision import DecisionLink, PaddingRows
from lightning_dit_parallel.parallel.cache.options import StepCacheConfig
from lightning_dit_parallel.parallel.cache.step_cache import StepCache
from lightning_dit_parallel.parallel.composition import cache_problem
from lightning_dit_parallel.parallel.fsdp import SHARD_AXES
from lightning_dit_parallel.parallel.layout import MESH_AXES
from lightning_dit_parallel.parallel.pipeline.comm import StageLink
from lightning_dit_parallel.parallel.pipeline.stages import StageAssignment
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.utils.hooks import WeightHooks

#: The mesh axes whose ranks decide together (see the module docstring).
DECISION_AXES: tuple[str, ...] = ("cfg", "ring", "ulysses", "tp")


def decision_group(mesh, fsdp: bool = False, cfg: bool = True):
    """The process group over ``DECISION_AXES`` (with ``fsdp``, also ``fsdp.SHARD_AXES``; without ``cfg``, less the
    cfg axis) of a mesh built by ``ParallelLayout.build_mesh`` (a collective: call on every rank); ``None`` when it is
    this rank alone."""
    wanted = set(DECISION_AXES) | (set(SHARD_AXES) if fsdp else set())
    if not cfg:
        wanted.discard("cfg")
    axes = tuple(axis for axis in MESH_AXES if axis in wanted)  # in mesh order
    if all(mesh[axis].size() == 1 for axis in axes):
        return None
    return mesh[axes]._flatten("step_cache" if cfg else "step_cache_no_cfg").get_group()


def check_step_cache(
    config: StepCacheConfig,
    model: nn.Module,
    plan: DiTPlan,
    *,
    pipefusion: bool = False,
    distrifusion: bool = False,
    assignment: StageAssignment | None = None,
) -> None:
    """Refuse what step caching cannot do, before any collective (pure: the same ``ValueError`` on every rank).

    Raises:
        ValueError: with PipeFusion or DistriFusion (their passes are patches with stale activations of the other
            patches; a skipped step would leave those stale by more than one step, and a patch pass is not a step);
            for a plan without block lists; with fbcache, when the first blocks are all the blocks or, with pipeline
            stages, not all on the first stage.
    """
    name = type(model).__name__
    problem = cache_problem(config.method, pipefusion=pipefusion, distrifusion=distrifusion)
    if problem:  # the layout rule (composition.py), also checked here for direct callers
        raise ValueError(problem)
    lists = plan.block_lists(model)
    total = sum(len(blocks) for _, blocks in lists)
    if not total:
        raise ValueError(f"Step caching skips transformer blocks, but the plan of {name} names none (DiTPlan.blocks).")
    first = config.options.first_blocks
    if config.method == "fbcache" and first >= total:
        raise ValueError(
            f"fbcache runs the first {first} blocks always and skips the rest, but {name} has {total} blocks; use a"
            " smaller cache_options first_blocks."
        )
    if config.method == "fbcache" and assignment is not None and assignment.sizes[0] < first:
        raise ValueError(
            f"fbcache decides after the first {first} blocks, which must all be on the first pipeline stage;"
            f" {assignment.describe(0)}. Give the first stage more layers (layers_per_stage) or fewer first_blocks."
        )


def apply_step_cache(
    model: nn.Module,
    plan: DiTPlan,
    config: StepCacheConfig,
    group=None,
    link: StageLink | None = None,
    steps_source: object | None = None,
    weight_hooks: Callable[[nn.Module], list[WeightHooks]] | None = None,
    separate_group=None,
    separate_calls: Callable[[], bool] | None = None,
    padding_rows: Callable[[Tensor], PaddingRows] | None = None,
) -> StepCache:
    """Install step caching on ``model`` (after every other parallelizer: its hooks see their arguments).

    Args:
        model: the DiT.
        plan: its plan.
        config: from ``options.cache_config``.
        group: the deciding ranks (``decision_group``); ``None``: this rank alone.
        link: this rank's pipeline stage link (``None`` without pipeline stages).
        steps_source: where ``num_inference_steps`` may be read (the LightningModule).
        weight_hooks: a block's hooks that only bring its weights in and out (the parallelizers' ``weight_hooks``),
            left out when the block is skipped; ``None``: none.
        separate_group: the deciding ranks without the cfg axis (``decision_group(mesh, fsdp, cfg=False)``).
        separate_calls: whether the current call is a separate CFG call (``CFGParallel.separate_calls``); then
            ``separate_group`` decides. ``None``: no CFG parallel.
        padding_rows: with sequence parallelism, where a tensor of this rank holds padding tokens
            (``SequenceParallel.padding_rows``): left out of the statistic, so that it is the one-process one.
    """
    decisions = DecisionLink(link) if link is not None and link.num_stages > 1 else None
    return StepCache(
        model, plan, config, group, decisions, steps_source, weight_hooks, separate_group, separate_calls, padding_rows
    ).install()
