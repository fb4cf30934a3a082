"""Hybrid layouts on 4 ranks: every composition gives the one-process output on every rank."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy, FSDPInferenceStrategy
from tests.models import (
    FAMILIES,
    build_cogvideox,
    build_dit,
    build_flux,
    build_sd3,
    build_wan,
    cogvideox_sampler,
    dit_sampler,
    flux_sampler,
    requests,
    sd3_sampler,
    text_requests,
    wan_sampler,
)
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single

#: Layouts whose 4 ranks all work on the same batch (dp = 1).
MODEL_PARALLEL_LAYOUTS = {
    "cfg2_ulysses2": dict(cfg_degree=2, ulysses_degree=2),
    "cfg2_ring2": dict(cfg_degree=2, ring_degree=2),
    "fsdp_ulysses4": dict(ulysses_degree=4, fsdp=True),
    "fsdp_cfg2_ulysses2": dict(cfg_degree=2, ulysses_degree=2, fsdp=True),
    "pp2_ulysses2": dict(pp_degree=2, ulysses_degree=2),
    "cfg2_pp2": dict(cfg_degree=2, pp_degree=2),
    "fsdp_pp2_ulysses2": dict(pp_degree=2, ulysses_degree=2, fsdp=True),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", MODEL_PARALLEL_LAYOUTS)
def test_model_parallel_layouts_on_four_ranks(family, layout, tmp_path):
    build, sampler = FAMILIES[family]
    reference = predict_single(sampler(build()), requests())
    strategy = DiTParallelStrategy(**MODEL_PARALLEL_LAYOUTS[layout], start_method="fork")
    assert_exact(predict_on_ranks(sampler(build()), requests(), strategy, 4, tmp_path), reference)


@pytest.mark.parametrize(
    "layout",
    [
        dict(dp_degree=2, ring_degree=2),
        dict(dp_degree=2, cfg_degree=2, fsdp=True),
        dict(dp_degree=2, pp_degree=2, fsdp=True),
    ],
)
def test_data_parallel_groups_with_model_parallel_inside(layout, tmp_path):
    """dp=2: ranks 0,1 form dp group 0 and ranks 2,3 dp group 1; samples are dealt round-robin over the groups."""
    reference = predict_single(dit_sampler(build_dit()), requests(4, batch_size=2))
    strategy = DiTParallelStrategy(**layout, start_method="fork")
    outputs = predict_on_ranks(dit_sampler(build_dit()), requests(4, batch_size=2), strategy, 4, tmp_path)
    assert_exact(outputs[0:2], reference[0::2])
    assert_exact(outputs[2:4], reference[1::2])


def test_registered_hybrid_name_accepts_every_degree(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=4,
        logger=False,
        enable_progress_bar=False,
        strategy="dit_hybrid",
    )
    assert type(trainer.strategy) is DiTParallelStrategy
    strategy = DiTParallelStrategy(dp_degree=1, cfg_degree=2, ulysses_degree=2, fsdp=True)
    assert strategy._requested_layout.describe() == "dp=1 cfg=2 pp=1 ring=1 ulysses=2 tp=1 fsdp=True"


def test_two_strategies_in_a_row_in_one_process(tmp_path):
    """FSDP + Ulysses, then CFG parallel, on the same module object: the parent process is left as it was."""
    env_before = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK")}
    module = dit_sampler(build_dit())
    reference = predict_single(dit_sampler(build_dit()), requests())
    fsdp = FSDPInferenceStrategy(ulysses_degree=2, start_method="fork")
    first = predict_on_ranks(module, requests(), fsdp, 2, tmp_path / "a")
    cfg = DiTParallelStrategy(cfg_degree=2, ulysses_degree=2, start_method="fork")
    second = predict_on_ranks(module, requests(), cfg, 4, tmp_path / "b")
    assert_exact(first, reference)
    assert_exact(second, reference)
    assert not torch.distributed.is_initialized()
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    plain = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert torch.cat(plain.predict(module, requests())).equal(reference)


def test_cfg_with_guidance_off_fails_in_a_hybrid_layout():
    trainer = L.Trainer(
        accelerator="cpu",
        devices=4,
        logger=False,
        enable_progress_bar=False,
        strategy=DiTParallelStrategy(cfg_degree=2, ulysses_degree=2, fsdp=True, start_method="fork", timeout=20),
    )
    with pytest.raises(Exception, match=r"classifier-free guidance is off in DiffusionSampler"):
        trainer.predict(dit_sampler(build_dit(), guidance_scale=1.0), requests(), return_predictions=False)


def test_data_parallel_results_gathered_in_order_by_the_writer(tmp_path):
    """dp=2 x cfg=2 with FSDP: the writer on rank 0 gets every sample once, in global-index order."""
    from lightning_dit_parallel.app.writer import OrderedPredictionWriter

    reference = predict_single(dit_sampler(build_dit()), requests(4, batch_size=1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=DiTParallelStrategy(dp_degree=2, cfg_degree=2, fsdp=True, start_method="fork"),
        callbacks=[OrderedPredictionWriter(tmp_path, save_images=False)],
    )
    trainer.predict(dit_sampler(build_dit()), requests(4, batch_size=1), return_predictions=False)
    written = torch.load(tmp_path / "predictions.pt")
    assert written["index"].tolist() == [0, 1, 2, 3]
    assert_exact([written["prediction"]], reference)


#: Text-conditioned families. Flux with 2 x 2 packed latents has 4 image tokens, as many as the doubled batch of
#: 2 samples: its position ids (4, 3) must not be mistaken for a batch by the CFG split.
OTHER_FAMILIES = {
    "sd3": (build_sd3, sd3_sampler),
    "flux": (build_flux, lambda model: flux_sampler(model, height=2, width=2)),
    "wan": (build_wan, wan_sampler),
    "cogvideox": (build_cogvideox, cogvideox_sampler),
}
OTHER_LAYOUTS = {
    "cfg2": (dict(cfg_degree=2), 2),
    "fsdp_ulysses2": (dict(ulysses_degree=2, fsdp=True), 2),
    "cfg2_pp2_fsdp": (dict(cfg_degree=2, pp_degree=2, fsdp=True), 4),
}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_text_conditioned_families(family, layout, tmp_path):
    build, sampler = OTHER_FAMILIES[family]
    degrees, devices = OTHER_LAYOUTS[layout]
    reference = predict_single(sampler(build()), text_requests())
    strategy = DiTParallelStrategy(**degrees, start_method="fork")
    assert_exact(predict_on_ranks(sampler(build()), text_requests(), strategy, devices, tmp_path), reference)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize(
    "degrees",
    [dict(pp_degree=2, ulysses_degree=2), dict(pp_degree=2, ring_degree=2)],
    ids=["pp2_ulysses2", "pp2_ring2"],
)
def test_pipeline_with_sequence_parallel_on_plans_that_cut_block_inputs(family, degrees, tmp_path):
    """Wan and CogVideoX cut their tokens at the first block's inputs; stage 1 cuts at its own first block."""
    build, sampler = OTHER_FAMILIES[family]
    reference = predict_single(sampler(build()), text_requests())
    strategy = DiTParallelStrategy(**degrees, start_method="fork")
    assert_exact(predict_on_ranks(sampler(build()), text_requests(), strategy, 4, tmp_path), reference)


def test_pipeline_with_sequence_parallel_needs_every_stage_to_cut():
    """A cut at the first list's blocks with a stage that owns only blocks of the second list is a ValueError."""
    from lightning_dit_parallel import ParallelLayout
    from lightning_dit_parallel.parallel.compose import _check_pipeline_with_sequence
    from lightning_dit_parallel.parallel.pipeline import PipelineOptions
    from lightning_dit_parallel.plan import DiTPlan, Split

    model = build_flux()  # one double-stream block, one single-stream block
    plan = DiTPlan(
        split_module_inputs={"transformer_blocks.0": {"hidden_states": Split("image", 1)}},
        gather_outputs={"proj_out": Split("image", 1)},
        blocks=("transformer_blocks", "single_transformer_blocks"),
        self_attention={"transformer_blocks.*.attn": ("image",)},
    )
    layout = ParallelLayout(pp=2, ulysses=2).resolve(4)
    with pytest.raises(ValueError, match=r"stage 1/2 owns blocks 1..1 of 2, none of them in 'transformer_blocks'"):
        _check_pipeline_with_sequence([("", model, plan)], layout, PipelineOptions())


def test_flux_fsdp_pipeline_and_ulysses_on_four_ranks(tmp_path):
    """FSDP over the Ulysses pair of each of two pipeline stages, on a plan that cuts forward arguments."""
    build, sampler = OTHER_FAMILIES["flux"]
    reference = predict_single(sampler(build()), text_requests())
    strategy = DiTParallelStrategy(pp_degree=2, ulysses_degree=2, fsdp=True, start_method="fork")
    assert_exact(predict_on_ranks(sampler(build()), text_requests(), strategy, 4, tmp_path), reference)


def test_parallelized_remove_undoes_every_parallelizer_and_raises_the_first_error():
    from lightning_dit_parallel.parallel.compose import Parallelized

    removed: list[str] = []

    class Part:
        def __init__(self, name: str, fails: bool) -> None:
            self.name, self.fails = name, fails

        def remove(self) -> None:
            removed.append(self.name)
            if self.fails:
                raise RuntimeError(f"{self.name} failed")

    handle = Parallelized(applied=[Part("first", False), Part("second", True), Part("third", True)])
    with pytest.raises(RuntimeError, match="third failed"):
        handle.remove()
    assert removed == ["third", "second", "first"] and not handle.applied

    class Gathering(Part):
        """A parallelizer whose ``remove`` needs collectives: after a failure, its ``discard`` runs instead."""

        def discard(self) -> None:
            removed.append(f"{self.name} discarded")

    removed.clear()
    handle = Parallelized(applied=[Gathering("fsdp", False), Part("hooks", False), Part("gather", True)])
    with pytest.raises(RuntimeError, match="gather failed"):
        handle.remove()
    assert removed == ["gather", "hooks", "fsdp discarded"] and not handle.applied


@pytest.mark.parametrize("step", ["predict_step", "validation_step", "test_step"])
def test_every_supported_step_starts_stateful_parallelizers_afresh(step, monkeypatch):
    """PipeFusion's caches and step count must not leak from one batch into the next, in validate and test too."""
    from lightning.pytorch.strategies.parallel import ParallelStrategy

    from lightning_dit_parallel.parallel.compose import Parallelized

    began: list[int] = []

    class Stateful:
        def begin_batch(self) -> None:
            began.append(1)

        def remove(self) -> None:
            pass

    monkeypatch.setattr(ParallelStrategy, step, lambda self, *args, **kwargs: "out")
    strategy = DiTParallelStrategy(ulysses_degree=2)
    strategy._parallelized = Parallelized(applied=[Stateful()])
    assert getattr(strategy, step)({"index": 0}, 0) == "out"
    assert began == [1]
