"""Ulysses with overlapped communication (``ulysses_overlap``): exact against the one-process model and the plain
Ulysses, on 2 and 4 ranks in one launch, with token counts that do not divide the degree and uneven head groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.parallel.sequence import ulysses
from lightning_dit_parallel.parallel.sequence.ulysses import check_overlap_option, head_group_sizes, overlap_head_groups
from lightning_dit_parallel.strategies import DiTParallelStrategy, SequenceParallelStrategy
from tests.distributed import run_on_ranks
from tests.models import build_dit

HEADS = 12  # U=2: 6 heads per rank (4 groups: 2,2,1,1 per rank); U=4: 3 per rank (2 groups: 2,1)
SAMPLE = 10  # 5 x 5 = 25 tokens: divides neither 2 nor 4
#: (ulysses degree, ulysses_overlap, expected head groups)
CASES = [
    (2, False, 1),
    (2, True, 2),
    (2, 3, 3),
    (2, 4, 4),
    (2, 6, 6),
    (4, False, 1),
    (4, True, 2),
    (4, 3, 3),
]


def test_head_group_sizes_and_choice():
    assert head_group_sizes(12, 2, 4) == [4, 4, 2, 2]
    assert head_group_sizes(12, 4, 2) == [8, 4]
    assert head_group_sizes(8, 2, 1) == [8]
    with pytest.raises(ValueError, match="cannot split"):
        head_group_sizes(8, 2, 5)
    assert overlap_head_groups(True, 1, "cpu", "m") == 1  # one head per rank: nothing to overlap
    assert overlap_head_groups(True, 6, "cpu", "m") == 2
    assert overlap_head_groups(False, 6, "cpu", "m") == 1
    assert overlap_head_groups("auto", 6, "cpu", "m") == ulysses.AUTO_HEAD_GROUPS["cpu"]
    assert overlap_head_groups("auto", 6, "unmeasured-device", "m") == 1
    with pytest.raises(ValueError, match="each rank attends to 6 heads"):
        overlap_head_groups(7, 6, "cpu", "m")
    for bad in (0, -1, "fast", 1.5, None):
        with pytest.raises(ValueError, match="ulysses_overlap must be"):
            check_overlap_option(bad)
    with pytest.raises(ValueError, match="ulysses_overlap must be"):
        SequenceParallelStrategy(ulysses_degree=2, ulysses_overlap="fast")
    assert SequenceParallelStrategy(ulysses_degree=2, ulysses_overlap=3)._ulysses_overlap == 3
    # an explicit overlap where nothing would be overlapped is refused at construction, not silently ignored
    for degrees in (dict(ring_degree=2, ulysses_degree=2), dict(ring_degree=2), dict(ulysses_degree=1, dp_degree=2)):
        for option in (True, 2):
            with pytest.raises(ValueError, match="needs ulysses_degree > 1 and ring_degree 1"):
                DiTParallelStrategy(**degrees, ulysses_overlap=option)
        for option in ("auto", False, 1):  # ask for nothing
            DiTParallelStrategy(**degrees, ulysses_overlap=option)


def _forward(model, x, t, labels):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels, return_dict=False)[0]


def _cases(rank: int, world: int) -> dict:
    x = torch.randn(2, 4, SAMPLE, SAMPLE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 7])
    labels = torch.tensor([1, 5])
    reference = _forward(build_dit(SAMPLE, heads=HEADS, layers=1), x, t, labels)  # one process, same seed
    calls = [0]
    all_to_all = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls[0] += 1
        return all_to_all(*args, **kwargs)

    results, plain = {}, {}
    dist.all_to_all_single = counting
    try:
        for degree, option, groups in CASES:
            layout = ParallelLayout(dp=world // degree, ulysses=degree).resolve(world)  # dp: the rest of the ranks
            model = build_dit(SAMPLE, heads=HEADS, layers=1)
            parallelize(model, layout, layout.build_mesh("cpu"), ulysses_overlap=option)
            calls[0] = 0
            out = _forward(model, x, t, labels)
            # one attention module per block, one block: 2 all-to-alls (q/k/v in, out back) per head group
            assert calls[0] == 2 * groups, (degree, option, calls[0])
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
            plain.setdefault(degree, out)
            torch.testing.assert_close(out, plain[degree], rtol=1e-5, atol=1e-6)  # the plain Ulysses (first case)
            results[f"{degree}/{option}"] = groups
        model = build_dit(SAMPLE, heads=HEADS, layers=1)
        layout = ParallelLayout(dp=world // 2, ulysses=2).resolve(world)
        try:
            parallelize(model, layout, layout.build_mesh("cpu"), ulysses_overlap=7)  # 6 heads per rank
            results["refused"] = "not refused"
        except ValueError as err:
            results["refused"] = str(err)
    finally:
        dist.all_to_all_single = all_to_all
    return results


def test_overlap_exact_on_2_and_4_ranks():
    for results in run_on_ranks(4, _cases, timeout_s=240):
        assert results.pop("refused").endswith("use at most 6, True (2 groups) or False."), results
        assert results == {f"{d}/{o}": g for d, o, g in CASES}
