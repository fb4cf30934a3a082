"""Which layouts compose: the one place that says "X with Y is refused" for a layout and its schedule options.

``composition_problems`` is pure computation on the degrees and the options (no model, no process group): the
strategy calls it at construction (on the requested layout, ``"auto"`` degrees not yet known) and again in
``setup_environment`` on the resolved layout, before any collective; ``parallelize`` calls it before it installs
anything; the planner (``planner/layouts.py``) keeps exactly the layouts for which it returns nothing. Refusals that
depend on the model (a plan that cannot be pipelined, heads that do not divide, cuts a stage does not make) stay with
the parallelizer that finds them.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_dit_parallel.parallel.layout import Degree, ParallelLayout
from lightning_dit_parallel.parallel.pipeline.options import PipelineOptions


def composition_problems(
    layout: ParallelLayout,
    *,
    pipeline: PipelineOptions | None = None,
    distrifusion: bool = False,
    cache: str | None = None,
    shard_modules: Sequence[str] | None = None,
    ulysses_overlap: object = "auto",
) -> list[str]:
    """Why ``layout`` with these options cannot run, one sentence each (``[]``: it composes).

    A degree still ``"auto"`` counts as unknown: a rule about it is checked once the layout is resolved.

    Args:
        layout: the degrees and FSDP, resolved or not.
        pipeline: the pipeline schedule (``None``: the default, micro-batches).
        distrifusion: the ring axis runs DistriFusion (``PatchParallelStrategy``) instead of Ring attention.
        cache: the step-caching method (``"fbcache"``, ``"teacache"``), ``None`` without caching.
        shard_modules: modules given to shard besides the DiT (``None``: the default).
        ulysses_overlap: the Ulysses head-group overlap option (``"auto"``, a bool or a number of head groups).

    The rules:
        - pipeline options other than the default need pipeline stages (``pp > 1``), one ``layers_per_stage`` entry
          per stage;
        - DistriFusion's patches are the ring axis (``ring > 1``), without pipeline stages, Ulysses or tensor
          parallelism (every rank holds the whole model; it composes with cfg, dp and FSDP);
        - step caching does not compose with PipeFusion or DistriFusion (``cache_problem``);
        - ``shard_modules`` needs a layout that cuts the DiT's memory (FSDP, pipeline stages or tensor parallelism);
        - an explicit Ulysses overlap (``ulysses_overlap=True`` or a number of head groups above 1) needs Ulysses
          (``ulysses > 1``) without Ring (``ring == 1``): with Ring the attention runs through Ring's kernel and
          nothing would be overlapped (``"auto"`` and ``False`` ask for nothing).
    """
    problems: list[str] = []
    options = pipeline or PipelineOptions()
    pipefusion = options.mode == "pipefusion"
    if _is(layout.pp, 1) and options != PipelineOptions():
        problems.append(f"Pipeline options need pp_degree > 1; got pp_degree=1 with {options.describe()}.")
    if isinstance(layout.pp, int) and options.layers_per_stage is not None:
        try:
            options.check_stages(layout.pp)
        except ValueError as error:
            problems.append(str(error))
    if distrifusion and (_is(layout.ring, 1) or _above_one(layout.pp, layout.ulysses, layout.tp)):  # tp: untested
        problems.append(
            "DistriFusion needs its patches on the ring axis (ring > 1) of a layout without pipeline stages, Ulysses or"
            f" tensor parallelism (every rank holds the whole model); got {layout.describe()}. Use"
            " PatchParallelStrategy(degree=...), optionally with cfg_degree, dp_degree and fsdp."
        )
    if cache is not None:
        problem = cache_problem(cache, pipefusion=pipefusion, distrifusion=distrifusion)
        if problem:
            problems.append(problem)
    if shard_modules and not (layout.fsdp or not _is(layout.pp, 1) or not _is(layout.tp, 1)):
        problems.append(
            f"shard_modules={list(shard_modules)} needs fsdp=True, pp_degree > 1 or tp_degree > 1"
            f" ({layout.describe()})."
        )
    overlap = ulysses_overlap is True or (type(ulysses_overlap) is int and ulysses_overlap > 1)
    if overlap and (_is(layout.ulysses, 1) or _above_one(layout.ring)):
        problems.append(
            f"ulysses_overlap={ulysses_overlap!r} overlaps Ulysses' all-to-alls with the attention of head groups; it"
            f" needs ulysses_degree > 1 and ring_degree 1 (got {layout.describe()}): with Ring or USP nothing would"
            " be overlapped. Use ulysses_overlap='auto' or False."
        )
    return problems


def check_composition(layout: ParallelLayout, **options) -> None:
    """``composition_problems`` as a ``ValueError`` naming every problem (pure: the same on every rank)."""
    problems = composition_problems(layout, **options)
    if problems:
        raise ValueError(" ".join(problems))


def cache_problem(method: str, *, pipefusion: bool, distrifusion: bool) -> str:
    """Why step caching ``method`` cannot run with PipeFusion or DistriFusion (``""`` when neither is used)."""
    if not (pipefusion or distrifusion):
        return ""
    which = "PipeFusion (pp_mode='pipefusion')" if pipefusion else "DistriFusion (PatchParallelStrategy)"
    return (
        f"cache={method!r} does not compose with {which}: those run each step as patch passes over stale"
        " activations of the other patches, which a skipped step would leave staler still. Use the exact layouts"
        " (Ulysses, Ring, USP, tensor parallel, FSDP, micro-batch pipeline, CFG, data parallel) with caching, or"
        " cache=None."
    )


def _is(degree: Degree, value: int) -> bool:
    """Whether a degree is known to equal ``value`` (``"auto"`` is not known yet)."""
    return degree != "auto" and degree == value


def _above_one(*degrees: Degree) -> bool:
    """Whether one of the degrees is known to exceed 1."""
    return any(d != "auto" and d > 1 for d in degrees)
