"""Convolutions over a sharded token grid: a window of whole rows with a halo, fetched point-to-point (gloo, CPU)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.parallel.sequence.sharding import ShardedSequence, ShardingState
from lightning_dit_parallel.parallel.sequence.token_grid import TokenGridHooks, check_callers, grid_window
from lightning_dit_parallel.plan import Split, TokenGrid
from lightning_dit_parallel.testing.comm_counter import CommCounter
from tests.distributed import run_on_ranks

B, C = 2, 3


class Block(nn.Module):
    """Lays out (B, S, C) tokens as (B, C, height, width) for two 3x3 convolutions (2 rows of halo)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ff = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.SiLU(), nn.Conv2d(C, C, 3, padding=1))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        grid = x.unflatten(1, (height, width)).permute(0, 3, 1, 2)  # (B, S, C) -> (B, C, H, W)
        return self.ff(grid).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, S, C)


def _groups(rank: int, world: int, ulysses: int) -> SequenceGroups:
    ring = world // ulysses
    uly = [dist.new_group([r * ulysses + u for u in range(ulysses)]) for r in range(ring)]
    rng = [dist.new_group([r * ulysses + u for r in range(ring)]) for u in range(ulysses)]
    return SequenceGroups(
        ulysses=uly[rank // ulysses] if ulysses > 1 else None, ring=rng[rank % ulysses] if ring > 1 else None
    )


def _run(rank: int, world: int, ulysses: int, height: int, width: int, halo: int) -> dict:
    block = Block().eval()
    x = torch.randn(B, height * width, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = block(x, height, width)
    groups = _groups(rank, world, ulysses)
    state = ShardingState(groups)
    hooks = TokenGridHooks(groups, lambda path: state)
    grids = [("block.ff", TokenGrid("image", ("height", "width"), dim=2, halo=halo))]
    modules = {"block": block, "block.ff": block.ff}
    check_callers(modules, grids)
    hooks.install(modules, grids)
    local = state.split(x, Split("image", 1), "test")  # (B, S, C) -> (B, ceil(S/N), C), padded
    with torch.no_grad(), CommCounter() as counter:
        out = block(local, height, width)
    for handle in hooks.handles:
        handle.remove()
    whole = state.gather(out, Split("image", 1), "test")
    error = ((whole - reference).abs().max() / reference.abs().max()).item()
    return {"error": error, "bytes": dict(counter.bytes_sent)}


@pytest.mark.parametrize(
    "world, ulysses, height, width",
    [(2, 2, 5, 3), (4, 2, 5, 3), (4, 1, 3, 1), (4, 4, 2, 7)],
    ids=["2ranks-5x3", "usp2x2-5x3", "ring4-3x1-a-rank-without-tokens", "ulysses4-2x7-shards-inside-a-row"],
)
def test_convolution_over_sharded_grid_equals_whole_grid(world: int, ulysses: int, height: int, width: int):
    for result in run_on_ranks(world, _run, ulysses, height, width, 2):
        assert result["error"] <= 1e-6, result
        # a window is the rank's rows plus 2 rows each side, of which at most 2 + 1 rows per side come from others
        assert result["bytes"].get("p2p", 0) <= 2 * 3 * width * B * C * 4, result["bytes"]


def test_too_small_a_halo_is_wrong():
    """Negative control: two 3x3 convolutions need 2 rows of halo; with 1 the rows next to a shard's edge are off."""
    errors = [r["error"] for r in run_on_ranks(2, _run, 2, 6, 4, 1)]
    assert max(errors) > 1e-3


@pytest.mark.parametrize(
    "length, shards, sizes, halo, windows",
    [
        (15, 2, (5, 3), 1, [(0, 12), (3, 15)]),  # shard 0: rows 0-2 (+1), shard 1: rows 2-4 (-1)
        (3, 4, (3, 1), 0, [(0, 1), (1, 2), (2, 3), (2, 3)]),  # shard 3 holds no real token: the last row
    ],
)
def test_grid_windows(length, shards, sizes, halo, windows):
    seq = ShardedSequence(length, shards)
    assert [grid_window(seq, s, sizes, halo) for s in range(shards)] == windows


def test_callers_must_take_the_size_arguments():
    block = Block()
    with pytest.raises(ValueError, match=r"\['rows'\] are not arguments of Block.forward"):
        check_callers({"block": block, "block.ff": block.ff}, [("block.ff", TokenGrid("image", ("rows", "width")))])


def test_plan_fields_name_split_sequences():
    from lightning_dit_parallel.plan import DiTPlan

    base = dict(split_outputs={"a": Split("image", 1)}, gather_outputs={"b": Split("image", 1)})
    DiTPlan(**base, linear_attention={"c": ("image",)}, token_grids={"d.ff": TokenGrid("image")})  # no softmax needed
    with pytest.raises(ValueError, match="linear_attention"):
        DiTPlan(**base, linear_attention={"c": ("video",)})
    with pytest.raises(ValueError, match="token_grids"):
        DiTPlan(**base, self_attention={"c": ("image",)}, token_grids={"d.ff": TokenGrid("video")})
