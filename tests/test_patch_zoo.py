"""PipeFusion and DistriFusion on every family of the model zoo (``tests/zoo/``), through their patched paths.

Both methods are exact when the stale keys and values they use equal the fresh ones. After a warm-up call (exact,
it fills the caches), a second call with the same inputs runs patched, PipeFusion in several passes per step,
DistriFusion with the other patches' keys from the previous call, and its stale keys are those of the same input:
so it must equal the one-process output (float32, relative 1e-5, every rank). That checks the cuts of every pass
(``Concat``, ``PrefixCount``, per-call and per-token splits, uneven patches), the caches' layout and masks, both
``text_tokens`` modes, the stage transfers and the asynchronous exchange, for every family at once. Families whose
plan PipeFusion cannot run must fail with their error on every rank (no hang).

Two launches: 2 ranks (PipeFusion pp 2 in both text modes, DistriFusion over 2 patches) and 4 ranks (PipeFusion
pp 2 x Ulysses 2 and pp 2 x Ring 2). ``pytest tests/test_patch_zoo.py --zoo flux,wan22`` runs only those families.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions, apply_distrifusion
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.pipeline import PipelineOptions, apply_pipeline
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.registry import plan_for
from tests.distributed import run_on_ranks
from tests.rank_outputs import max_relative_error
from tests.test_zoo import selected_cases
from tests.zoo import family

#: name -> (world size, method, layout degrees, options)
LAYOUTS = {
    "pipefusion_pp2_per_step_3patches": (2, "pipefusion", dict(pp=2), dict(num_patches=3, text_tokens="per_step")),
    "pipefusion_pp2_every_patch": (2, "pipefusion", dict(pp=2), dict(num_patches=2, text_tokens="every_patch")),
    "distrifusion2": (2, "distrifusion", dict(ring=2), {}),
    "pipefusion_pp2_ulysses2": (4, "pipefusion", dict(pp=2, ulysses=2), dict(num_patches=2)),
    "pipefusion_pp2_ring2": (4, "pipefusion", dict(pp=2, ring=2), dict(num_patches=2, text_tokens="every_patch")),
}

#: family -> the ValueError PipeFusion gives it with these tiny models (2 stages), on every rank.
PIPEFUSION_ERRORS = {
    "auraflow": "cuts tokens at the inputs of 'joint_transformer_blocks.0'",  # 1 + 1 blocks: stage 1 holds no joint one
    "hunyuan_image": "cuts tokens at the inputs of 'transformer_blocks.0'",
    "hunyuan_video": "cuts tokens at the inputs of 'transformer_blocks.0'",
    "hidream": "cannot be cut into pipeline stages",
    "hunyuan_dit": "cannot be cut into pipeline stages",
    "latte": "cannot be cut into pipeline stages",
    "wan_vace": "cannot be cut into pipeline stages",
    "ltx2": "1 transformer blocks into 2 pipeline stages",
    "mochi": "replicated_tail_attention",
    "sana": "linear_attention",
    "sana_video": "linear_attention",
    "lumina2": "PipeFusion cannot run this plan: it gathers",
    "z_image": "PipeFusion cannot run this plan: it gathers",
    "qwenimage21": "head_parallel_attention",  # attention over the whole sequence (Ulysses at the projections only)
}

#: family -> the ValueError DistriFusion (ring patches) gives it, on every rank.
DISTRIFUSION_ERRORS = {
    "qwenimage21": "which only Ulysses gives each rank",
}


def _run_layouts(rank: int, world: int, names: list[str], case_names: list[str]) -> dict[str, dict[str, object]]:
    """Every case under every named layout: the relative error of the second (patched) call, or the error text."""
    from tests.zoo import all_cases

    cases = [c for c in all_cases() if c.name in case_names]
    results: dict[str, dict[str, object]] = {}
    for name in names:
        _, method, degrees, options = LAYOUTS[name]
        mesh = ParallelLayout(**degrees).resolve(world).build_mesh("cpu")
        groups = SequenceGroups.from_mesh(mesh)
        results[name] = {}
        for case in cases:
            model = case.build()
            with torch.no_grad():
                reference = case.output(model(**case.inputs(model)))
            try:
                if method == "pipefusion":
                    sequence = groups if groups.size > 1 else None
                    installed = apply_pipeline(
                        model,
                        plan_for(model),
                        PipelineOptions("pipefusion", warmup_steps=1, **options),
                        mesh.get_group("pp"),
                        sequence,
                    )
                else:
                    installed = apply_distrifusion(model, plan_for(model), groups, DistriFusionOptions(warmup_steps=1))
                with torch.no_grad():
                    model(**case.inputs(model))  # warm-up: exact, fills the caches
                    output = case.output(model(**case.inputs(model)))  # patched, stale keys = fresh keys
                installed.remove()
                results[name][case.name] = max_relative_error(output, reference)
            except (ValueError, NotImplementedError) as error:
                results[name][case.name] = f"{type(error).__name__}: {error}"
        dist.barrier()
    return results


def _check(results: list[dict[str, dict[str, object]]], names: list[str], cases) -> list[str]:
    problems = []
    for name in names:
        method = LAYOUTS[name][1]
        for case in cases:
            expected = (PIPEFUSION_ERRORS if method == "pipefusion" else DISTRIFUSION_ERRORS).get(family(case))
            for rank, per_rank in enumerate(results):
                got = per_rank[name][case.name]
                if expected is not None:
                    if not isinstance(got, str) or expected not in got:
                        problems.append(f"{name} {case.name} rank {rank}: expected an error with {expected!r}: {got}")
                elif isinstance(got, str) or not got <= 1e-5:
                    problems.append(f"{name} {case.name} rank {rank}: {got}")
    return problems


@pytest.mark.parametrize("world", [2, 4])
def test_patched_call_after_warmup_is_exact(world, request):
    cases = selected_cases(request.config)
    names = [name for name, layout in LAYOUTS.items() if layout[0] == world]
    results = run_on_ranks(world, _run_layouts, names, [c.name for c in cases], timeout_s=600)
    problems = _check(results, names, cases)
    assert not problems, "\n".join(problems)
