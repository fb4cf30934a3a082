"""CFG parallel: the doubled batch split over two ranks gives the one-process output; misuse is a clear error."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy, ParallelLayout, Split, parallelize
from lightning_dit_parallel.parallel.batch import first_batch_size, split_argument
from tests.distributed import run_on_ranks
from tests.models import FAMILIES, build_dit, dit_sampler, requests
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_parallel_on_two_ranks_equals_single_process(family, tmp_path):
    build, sampler = FAMILIES[family]
    reference = predict_single(sampler(build()), requests(3, batch_size=2))  # batches of 2 and 1 samples
    strategy = DiTParallelStrategy(cfg_degree=2, start_method="fork")
    assert_exact(predict_on_ranks(sampler(build()), requests(3, batch_size=2), strategy, 2, tmp_path), reference)


def test_guidance_off_is_a_clear_error(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_progress_bar=False,
        strategy=DiTParallelStrategy(cfg_degree=2, start_method="fork", timeout=20),
    )
    with pytest.raises(Exception, match=r"cfg_degree=2 splits the doubled .* guidance_scale=1.0"):
        trainer.predict(dit_sampler(build_dit(), guidance_scale=1.0), requests(), return_predictions=False)


def _odd_batch(rank: int, world: int) -> str:
    layout = ParallelLayout(cfg=2).resolve(world)
    dit = build_dit()
    handle = parallelize(dit, layout, layout.build_mesh("cpu"))
    x = torch.randn(3, 4, 8, 8)
    try:  # the first step is computed whole (one call or two?); the second step's call shows one call per step
        for t in (1.0, 2.0):
            dit(x, timestep=torch.full((3,), t), class_labels=torch.zeros(3, dtype=torch.long))
    except ValueError as exc:
        return str(exc)
    finally:
        handle.remove()
    return "no error"


def test_odd_batch_fails_on_every_rank_before_any_collective():
    for message in run_on_ranks(2, _odd_batch, timeout_s=60):
        assert "forward(hidden_states=...) has batch size 3, which does not divide by 2" in message
        assert "is called once per denoising step" in message


def _remove_restores(rank: int, world: int) -> dict:
    layout = ParallelLayout(cfg=2).resolve(world)
    sampler = dit_sampler(build_dit())
    batch = next(iter(requests()))
    plain = sampler.sample(batch)
    handle = parallelize(sampler, layout, layout.build_mesh("cpu"))
    parallel = sampler.sample(batch)
    handle.remove()
    return {
        "error": ((parallel - plain).abs().max() / plain.abs().max()).item(),
        "no_hooks": all(not m._forward_hooks and not m._forward_pre_hooks for m in sampler.modules()),
        "after": bool(sampler.sample(batch).equal(plain)),
    }


def test_remove_restores_the_plain_model():
    for rank, r in enumerate(run_on_ranks(2, _remove_restores)):
        assert r["error"] <= 1e-5 and r["no_hooks"] and r["after"], f"rank {rank}: {r}"


def test_split_argument_cuts_batch_tensors_only():
    batch = 4
    x = torch.arange(4 * 3).reshape(4, 3)
    nested = {"resolution": torch.arange(4), "scalar": torch.tensor(2.0), "one": torch.ones(1)}
    assert first_batch_size({"timestep": torch.tensor(1.0), "hidden_states": x}) == ("hidden_states", 4)
    assert split_argument(x, batch, 1, 2, None).equal(x[2:])
    cut = split_argument(nested, batch, 0, 2, None)
    assert cut["resolution"].equal(torch.arange(2))
    assert cut["scalar"].equal(nested["scalar"]) and cut["one"].equal(nested["one"])
    # a plan input cut along dim 0 is a sequence without a batch dim (Flux img_ids (S, 3)): never a batch row
    ids = torch.arange(4 * 3).reshape(4, 3)
    assert split_argument(ids, batch, 1, 2, Split("image", 0)).equal(ids)
    assert split_argument((x, ids), batch, 1, 2, (Split("image", 1), Split("image", 0)))[1].equal(ids)
