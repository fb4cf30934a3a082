"""What an FSDP rank holds on top of its shards while a unit runs, and ``fsdp_units="rows"``'s exactness.

- A unit gathered by FSDP2 costs at most twice its size on top of the shards (the all-gather buffer and the parameters
  it is copied into: ``fsdp/gather_buffer.py`` frees the buffer right after the copy; FSDP2 alone keeps it until the
  next unit's all-gather, three times a large unit). ``fsdp_units="rows"`` never gathers a Linear: a rank holds one
  other rank's rows at a time (``fsdp/row_stream.py``). Measured as the peak resident set of each rank across two
  consecutive 64 MB Linears.
- ``fsdp_units="rows"`` equals one process (float32, relative 1e-5) on four families, sharpened attention, token counts
  that do not divide 2 or 4, on 2 and 4 ranks, with data parallelism (every rank its own inputs) and with Ulysses; no
  streamed Linear is ever unsharded; after ``remove()`` the plain model gives the same output again.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.parallel.fsdp import apply_fsdp, is_sharded
from lightning_dit_parallel.parallel.rows import row_counts
from lightning_dit_parallel.utils.memory import current_rss, peak_rss, reset_peak_rss
from tests.distributed import run_on_ranks
from tests.rank_outputs import max_relative_error
from tests.zoo import flux, hunyuan_video, sana, wan22

MB = 1 << 20
#: (in, out) of each Linear: 2048 x 8192 float32 = 64 MB (a shard of 32 MB on 2 ranks)
WIDTH, HIDDEN = 2048, 8192


def _peaks(rank: int, world: int) -> dict[str, float]:
    """Peak resident bytes (MB) above the resident set before a forward of two consecutive 64 MB Linear units."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    peaks = {}
    for units in ("layers", "rows"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH))
        sharding = apply_fsdp(model, [model[0], model[1], model], mesh, rows=units == "rows")
        x = torch.randn(4, WIDTH)
        with torch.no_grad():
            model(x)  # FSDP2's lazy initialization
            before = current_rss()
            if not reset_peak_rss():
                pytest.skip("this kernel does not reset VmHWM (/proc/self/clear_refs)")
            model(x)
            peaks[units] = (peak_rss() - before) / MB
        sharding.remove()
    return peaks


def test_a_rank_holds_a_gathered_unit_twice_at_most_and_rows_never_gather():
    matrix = WIDTH * HIDDEN * 4 / MB  # 64 MB
    for peaks in run_on_ranks(2, _peaks):
        # FSDP2 alone: the previous unit's buffer too (3 x 64 MB); here the buffer and the parameters at the copy
        assert peaks["layers"] < 2.5 * matrix, peaks
        # rows: one other rank's rows (32 MB) and the output's columns
        assert peaks["rows"] < 0.75 * matrix, peaks


#: families whose Linears have different shapes (fused QKV, gated MLPs, adaptive norms), sharp attention, token counts
#: that do not divide 2 or 4 (``tests/zoo``)
CASES = [wan22.CASES[1], flux.CASES[1], hunyuan_video.CASES[0], sana.CASES[0]]
LAYOUTS = {
    2: {"dp2": dict(dp=2), "ulysses2": dict(ulysses=2)},
    4: {"dp4": dict(dp=4), "ulysses2_dp2": dict(ulysses=2, dp=2)},
}


def _own_inputs(inputs: dict, index: int) -> dict:
    """The case's inputs, shifted by ``index``: each data-parallel rank computes a different sample."""
    return {k: v + 0.25 * index if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def _rows(rank: int, world: int) -> dict:
    results = {}
    for case in CASES:
        model = case.build()
        for name, degrees in LAYOUTS[world].items():
            layout = ParallelLayout(fsdp=True, **degrees).resolve(world)
            mesh = layout.build_mesh("cpu")
            inputs = _own_inputs(case.inputs(model), mesh["dp"].get_local_rank())
            with torch.no_grad():
                reference = case.output(model(**inputs))
                handle = parallelize(model, layout, mesh, check_inputs=False, fsdp_units="rows")
                streamed = [s.linear for a in handle.applied for s in getattr(a, "streamed", [])]
                seen: list[bool] = []  # whether each streamed Linear's weight was still sharded in its forward
                hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(is_sharded(m.weight))) for m in streamed]
                try:
                    parallel = case.output(model(**inputs))
                finally:
                    for hook in hooks:
                        hook.remove()
                    handle.remove()
                after = case.output(model(**inputs))
            results[f"{case.name}/{name}"] = dict(
                error=max_relative_error(parallel, reference),
                after=max_relative_error(after, reference),
                streamed=len(streamed),
                calls=len(seen),
                sharded=all(seen),
                forward_restored=all("forward" not in m.__dict__ for m in streamed),
            )
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_rows_units_equal_one_process(world: int):
    for results in run_on_ranks(world, _rows):
        for name, r in results.items():
            assert r["streamed"] > 0 and r["calls"] >= r["streamed"], (name, r)
            assert r["sharded"], f"{name}: a streamed Linear was gathered"
            assert r["forward_restored"], name
            assert r["error"] <= 1e-5 and r["after"] <= 1e-5, (name, r)


def test_row_counts_follow_torch_chunk():
    for rows in range(1, 13):
        for ranks in (1, 2, 3, 4, 8):
            pieces = [len(p) for p in torch.arange(rows).chunk(ranks)]
            assert row_counts(rows, ranks) == pieces + [0] * (ranks - len(pieces))


def test_auto_units_are_rows_or_layers_with_tensor_parallelism_and_rows_with_it_is_refused():
    from lightning_dit_parallel.parallel.fsdp import resolve_fsdp_units

    assert resolve_fsdp_units("auto", 1) == "rows" and resolve_fsdp_units("auto", 2) == "layers"
    assert resolve_fsdp_units("blocks", 2) == "blocks" and resolve_fsdp_units("rows", 1) == "rows"
    with pytest.raises(ValueError, match="tensor parallelism"):
        resolve_fsdp_units("rows", 2)
    with pytest.raises(ValueError, match="fsdp_units must be"):
        resolve_fsdp_units("columns", 1)
