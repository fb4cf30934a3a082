"""Memory-lean loading: a rank reads from safetensors only the parameters (or the shard rows) it keeps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from lightning_dit_parallel import DiTParallelStrategy, ParallelLayout, parallelize
from lightning_dit_parallel.loading import (
    build_on_meta,
    defer_weights,
    load_local_weights,
    materialize,
    save_weights,
)
from lightning_dit_parallel.utils.memory import resident_bytes
from tests.distributed import run_on_ranks
from tests.models import build_dit, dit_sampler, requests
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single


def meta_dit(config) -> DiTTransformer2DModel:
    return build_on_meta(lambda: DiTTransformer2DModel.from_config(config).eval())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The seeded, sharpened test DiT saved to safetensors; returns (file, config)."""
    model = build_dit()
    file = tmp_path_factory.mktemp("weights") / "dit.safetensors"
    save_weights(model, file)
    return file, model.config


def test_build_on_meta_holds_no_parameter_memory(weights):
    file, config = weights
    model = meta_dit(config)
    assert all(p.is_meta for p in model.parameters())
    assert resident_bytes(model, buffers=False) == 0
    read = load_local_weights(model, file)
    assert read == resident_bytes(build_dit(), buffers=False)
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("layout", [dict(dp_degree=2, fsdp=True), dict(pp_degree=2), dict(ulysses_degree=2, fsdp=True)])
def test_deferred_weights_through_trainer_equal_single_process(weights, layout, tmp_path):
    file, config = weights
    reference = predict_single(dit_sampler(build_dit()), requests(2, batch_size=1))
    module = dit_sampler(defer_weights(meta_dit(config), file))
    strategy = DiTParallelStrategy(**layout, start_method="fork")
    outputs = predict_on_ranks(module, requests(2, batch_size=1), strategy, 2, tmp_path)
    if layout.get("dp_degree") == 2:
        assert_exact([outputs[0]], reference[0::2])
        assert_exact([outputs[1]], reference[1::2])
    else:
        assert_exact(outputs, reference)


def _load_sharded(rank: int, world: int, file, config, layout_kwargs: dict) -> dict:
    layout = ParallelLayout(**layout_kwargs).resolve(world)
    batch = next(iter(requests()))
    reference = dit_sampler(build_dit()).sample(batch)
    sampler = dit_sampler(defer_weights(meta_dit(config), file))
    handle = parallelize(sampler, layout, layout.build_mesh("cpu"))
    assert materialize(sampler) == ["transformer"]
    held = resident_bytes(sampler.transformer, buffers=False)
    out = sampler.sample(batch)
    handle.remove()
    return {"held": held, "error": ((out - reference).abs().max() / reference.abs().max()).item()}


@pytest.mark.parametrize("layout", [dict(dp=2, fsdp=True), dict(pp=2)])
def test_each_rank_holds_about_half_after_loading(weights, layout):
    file, config = weights
    full = resident_bytes(build_dit(), buffers=False)
    for rank, r in enumerate(run_on_ranks(2, _load_sharded, file, config, layout)):
        # FSDP: 1/2 of every tensor's rows; pp=2: one of two blocks plus the embeddings and final layer
        limit = 0.55 if layout.get("fsdp") else 0.75
        assert r["held"] <= limit * full, f"rank {rank}: holds {r['held']} of {full} parameter bytes"
        assert r["error"] <= 1e-5, f"rank {rank}: max relative error {r['error']:.2e}"


def test_missing_file_and_missing_keys_are_clear_errors(weights, tmp_path):
    file, config = weights
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        defer_weights(meta_dit(config), tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({"pos_embed.proj.weight": torch.zeros(1)}, str(partial))
    with pytest.raises((KeyError, ValueError), match="lacks|shape"):
        load_local_weights(meta_dit(config), partial)
