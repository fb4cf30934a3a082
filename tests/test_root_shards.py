"""Pipeline stages shard the DiT's weights outside its blocks between DiT calls (``pipeline/root_shards.py``).

- Between calls each stage holds its rows of every root weight matrix (a DTensor ``Shard(0)``, torch's chunk sizes, a
  zero-row rank included; biases whole); during a call the parameters are whole plain tensors; the output equals the
  whole model; a root submodule called outside the DiT's forward (and inside it) works; ``remove()`` gives the whole
  parameters back, tied ones still tied. A toy with uneven row counts, on 2 and 4 ranks.
- Through ``parallelize`` on Wan 2.2, Flux and HunyuanVideo zoo cases (sharpened attention, token counts that do not
  divide the degree): pipeline 2, pipeline 2 x Ulysses 2 and pipeline 4 (a 4-block Wan) equal one process (float32,
  relative 1e-5), the root sharded between calls, and the plain model equal again after ``remove()``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.parallel.pipeline.root_shards import RootShards, apply_root_shards
from tests.distributed import run_on_ranks
from tests.models import tiny_wan
from tests.rank_outputs import max_relative_error
from tests.zoo import ZooCase, flux, hunyuan_video, seeded_model, wan22


class _Toy(nn.Module):
    """A root (uneven row counts, a tied weight, a 1-row parameter) around two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(7, 5)  # 5 rows: 3 + 2 on 2 ranks, 2 + 2 + 1 + 0 on 4
        self.blocks = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5)])
        self.head = nn.Linear(5, 9)
        self.again = nn.Linear(5, 9)
        self.again.weight = self.head.weight  # tied
        self.gate = nn.Parameter(torch.randn(1, 5))  # fewer rows than stages: whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.gate
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h) + self.again(h)


class _ToyPlan:
    def block_lists(self, model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        return [("blocks", model.blocks)]


def _toy(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = _Toy()
    x = torch.randn(3, 7)
    whole = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(x)
        shards: RootShards = apply_root_shards(model, _ToyPlan(), init_device_mesh("cpu", (world,)))
        between = {
            name: tuple(p.to_local().shape) if isinstance(p, DTensor) else None
            for name, p in model.named_parameters(remove_duplicate=False)
        }
        inside: list[bool] = []  # during the call: every root parameter whole and plain
        hook = model.blocks[0].register_forward_pre_hook(
            lambda m, a: inside.append(not any(isinstance(p, DTensor) for p in model.parameters()))
        )
        output = model(x)
        hook.remove()
        borrowed = model.head(torch.ones(2, 5))  # a root submodule called on its own
        after_borrow = isinstance(model.head.weight, DTensor)
        shards.remove()
        after = model(x)
    return dict(
        between=between,
        inside=inside,
        error=max_relative_error(output, reference),
        borrowed=max_relative_error(borrowed, torch.ones(2, 5) @ whole["head.weight"].T + whole["head.bias"]),
        after_borrow=after_borrow,
        after=max_relative_error(after, reference),
        restored=all(torch.equal(p, whole[n]) for n, p in model.named_parameters()),
        tied=model.again.weight is model.head.weight,
        plain=not any(isinstance(p, DTensor) for p in model.parameters()),
    )


@pytest.mark.parametrize("world", [2, 4])
def test_root_rows_between_calls_whole_during_them(world: int):
    embed = {2: [3, 2], 4: [2, 2, 1, 0]}[world]  # torch.chunk's sizes of 5 rows
    head = {2: [5, 4], 4: [3, 3, 3, 0]}[world]  # of 9 rows
    for rank, r in enumerate(run_on_ranks(world, _toy)):
        b = r["between"]
        assert b["embed.weight"] == (embed[rank], 7) and b["embed.bias"] is None, (rank, b)  # 1-D: whole
        assert b["head.weight"] == b["again.weight"] == (head[rank], 5), (rank, b)
        assert b["gate"] is None and all(b[f"blocks.{i}.weight"] is None for i in (0, 1)), b
        assert r["inside"] == [True], r
        assert r["error"] == 0.0 and r["borrowed"] <= 1e-6 and r["after"] == 0.0, r
        assert r["after_borrow"], "the borrowed submodule kept its whole weight after its call"
        assert r["restored"] and r["tied"] and r["plain"], r


def _wan_4_blocks() -> WanTransformer3DModel:
    return seeded_model(lambda: WanTransformer3DModel(**tiny_wan(in_channels=48, out_channels=48, num_layers=4)))


WAN4 = ZooCase("wan22-4blocks-27vid-7txt", _wan_4_blocks, wan22.inputs(3, 3, 3, 7, "per_token"))
CASES = {
    2: [(case, dict(pp=2)) for case in (wan22.CASES[1], flux.CASES[1], hunyuan_video.CASES[0])],
    4: [
        (flux.CASES[1], dict(pp=2, ulysses=2)),
        (wan22.CASES[1], dict(pp=2, ulysses=2)),
        (hunyuan_video.CASES[0], dict(pp=2, dp=2)),
        (WAN4, dict(pp=4)),
    ],
}


def _through_parallelize(rank: int, world: int) -> dict:
    results = {}
    for case, degrees in CASES[world]:
        model = case.build()
        layout = ParallelLayout(**degrees).resolve(world)
        mesh = layout.build_mesh("cpu")
        inputs = case.inputs(model)
        with torch.no_grad():
            reference = case.output(model(**inputs))
            handle = parallelize(model, layout, mesh, check_inputs=False)
            sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
            blocks = {n for n, _ in model.named_parameters() if ".blocks." in f".{n}" or "transformer_blocks" in n}
            try:
                parallel = case.output(model(**inputs))
                still = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
            finally:
                handle.remove()
            after = case.output(model(**inputs))
        results[f"{case.name}/{degrees}"] = dict(
            error=max_relative_error(parallel, reference),
            after=max_relative_error(after, reference),
            sharded=len(sharded),
            in_blocks=sorted(set(sharded) & blocks),
            still=still == sharded,
            plain=not any(isinstance(p, DTensor) for p in model.parameters()),
        )
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_stages_shard_the_root_and_equal_one_process(world: int):
    for results in run_on_ranks(world, _through_parallelize):
        for name, r in results.items():
            assert r["sharded"] > 0 and not r["in_blocks"] and r["still"], (name, r)
            assert r["error"] <= 1e-5 and r["after"] <= 1e-5, (name, r)
            assert r["plain"], name
