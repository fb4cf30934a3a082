"""SequenceParallelStrategy through Trainer.predict: exact against one process, on every rank.

The LightningModule runs a diffusers scheduler loop with classifier-free guidance over a small seeded
DiT (self-attention) and PixArt (cross-attention to text), attention sharpened.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch import nn

from lightning_dit_parallel import DiTParallelStrategy, SequenceParallelStrategy
from tests.distributed import run_on_ranks
from tests.models import FAMILIES, build_dit, dit_sampler, requests
from tests.rank_outputs import SaveRankOutputs, assert_exact, load_rank_outputs, predict_on_ranks, predict_single


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sample_size", [8, 6])  # 16 tokens, and 9 tokens (padded on 2 and 4 ranks)
def test_ulysses_equals_single_process(family, sample_size, tmp_path):
    build, sampler = FAMILIES[family]
    reference = predict_single(sampler(build(sample_size)), requests())
    for n in (2, 4):
        strategy = SequenceParallelStrategy(ulysses_degree=n, start_method="fork")
        outputs = predict_on_ranks(sampler(build(sample_size)), requests(), strategy, n, tmp_path / f"u{n}")
        assert_exact(outputs, reference)


def test_registered_name_through_trainer(tmp_path):
    reference = predict_single(dit_sampler(build_dit()), requests())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="dit_ulysses",
        logger=False,
        enable_progress_bar=False,
        callbacks=[SaveRankOutputs(tmp_path)],
    )
    assert isinstance(trainer.strategy, SequenceParallelStrategy)
    trainer.strategy._start_method = "fork"  # registered names use the script launcher; tests fork
    trainer.strategy._configure_launcher()
    trainer.predict(dit_sampler(build_dit()), requests(), return_predictions=False)
    assert_exact(load_rank_outputs(tmp_path, 2), reference)


def test_data_parallel_groups_get_different_samples(tmp_path):
    """ulysses=2 on 4 ranks leaves dp=2: each dp group generates half the samples, both ranks of a group agree."""
    reference = predict_single(dit_sampler(build_dit()), requests(4, batch_size=1))
    strategy = SequenceParallelStrategy(ulysses_degree=2, start_method="fork")
    outputs = predict_on_ranks(dit_sampler(build_dit()), requests(4, batch_size=1), strategy, 4, tmp_path)
    # ranks 0,1 form dp group 0 and ranks 2,3 dp group 1; the predict sampler deals samples round-robin
    assert_exact(outputs[0:2], reference[0::2])
    assert_exact(outputs[2:4], reference[1::2])


def test_two_predicts_in_a_row_with_different_strategies(tmp_path):
    env_before = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK")}
    module = dit_sampler(build_dit())
    reference = predict_single(dit_sampler(build_dit()), requests())
    first = predict_on_ranks(
        module, requests(), SequenceParallelStrategy(ulysses_degree=2, start_method="fork"), 2, tmp_path / "a"
    )
    second = predict_on_ranks(
        module, requests(), SequenceParallelStrategy(ring_degree=4, start_method="fork"), 4, tmp_path / "b"
    )
    assert_exact(first, reference)
    assert_exact(second, reference)
    # the parent process is left as it was: no hooks, no process group, no launcher variables
    assert not torch.distributed.is_initialized()
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert torch.cat(
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).predict(module, requests())
    ).equal(reference)


def _parallelize_then_remove(rank: int, world: int) -> str:
    import torch.nn.functional as F

    from lightning_dit_parallel import ParallelLayout, parallelize

    original_sdpa = F.scaled_dot_product_attention
    layout = ParallelLayout(ulysses=world).resolve(world)
    sampler = dit_sampler(build_dit())
    plain = sampler.sample(next(iter(requests())))
    handle = parallelize(sampler, layout, layout.build_mesh("cpu"))
    assert handle.paths == ["transformer"]
    assert any(m._forward_pre_hooks for m in sampler.modules())
    parallel = sampler.sample(next(iter(requests())))
    handle.remove()
    assert F.scaled_dot_product_attention is original_sdpa
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sampler.modules())
    after = sampler.sample(next(iter(requests())))  # the plain model again: no communication
    assert after.equal(plain)
    return f"{((parallel - plain).abs().max() / plain.abs().max()).item():.3e}"


def test_parallelize_remove_restores_the_plain_model():
    for error in run_on_ranks(2, _parallelize_then_remove):
        assert float(error) <= 1e-5


@pytest.mark.parametrize(
    "strategy, devices, match",
    [
        (dict(ulysses_degree=3), 2, "multiply to 3, which does not divide the world size 2"),
        (dict(ulysses_degree=2, ring_degree=2, dp_degree=1), 2, "multiply to 4 but the world size is 2"),
    ],
)
def test_bad_layout_fails_on_every_rank_before_collectives(strategy, devices, match):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_progress_bar=False,
        strategy=SequenceParallelStrategy(**strategy, start_method="fork", timeout=20),
    )
    with pytest.raises(Exception, match=match):
        trainer.predict(dit_sampler(build_dit()), requests(), return_predictions=False)


def test_module_without_plan_is_a_clear_error():
    class NoPlan(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

        def predict_step(self, batch, batch_idx):
            return self.net(batch["x"])

    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_progress_bar=False,
        strategy=SequenceParallelStrategy(ulysses_degree=2, start_method="fork", timeout=20),
    )
    loader = torch.utils.data.DataLoader([{"x": torch.ones(2)}])
    with pytest.raises(Exception, match="register_plan"):
        trainer.predict(NoPlan(), loader, return_predictions=False)


def test_heads_not_divisible_is_a_clear_error():
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_progress_bar=False,
        strategy=SequenceParallelStrategy(ulysses_degree=2, start_method="fork", timeout=20),
    )
    with pytest.raises(Exception, match="ulysses_degree=1, ring_degree=2"):
        trainer.predict(dit_sampler(build_dit(heads=3)), requests(), return_predictions=False)


def test_training_is_rejected(tmp_path):
    class Trainable(type(dit_sampler(build_dit()))):
        def training_step(self, batch, batch_idx):
            return self.transformer.pos_embed.proj.weight.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    sampler = dit_sampler(build_dit())
    trainable = Trainable(sampler.transformer, sampler.scheduler, sampler.conditioning, sampler.latent_shape)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_progress_bar=False,
        max_steps=1,
        strategy=DiTParallelStrategy(ulysses_degree=2, start_method="fork", timeout=20),
    )
    with pytest.raises(Exception, match="supports inference"):
        trainer.fit(trainable, requests())
