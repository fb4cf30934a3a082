"""A LightningModule that holds a diffusers pipeline as a plain attribute (``self.pipe = ...``, nothing else
registered) and calls ``self.pipe(...)`` in ``predict_step``: every strategy preset finds the pipeline's
transformer by its plan and equals one process (float32, relative 1e-5). PixArt-Sigma is built in memory; FLUX.1
is saved with ``save_pretrained`` and loaded with ``FluxPipeline.from_pretrained`` inside the module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import FluxPipeline
from torch.utils.data import DataLoader

from lightning_dit_parallel import (
    DiTParallelStrategy,
    FSDPInferenceStrategy,
    PipelineStrategy,
    SequenceParallelStrategy,
)
from lightning_dit_parallel.app.prompts import prompt_loader
from lightning_dit_parallel.utils.pipelines import PipelineModule, attach_pipelines
from tests.pipelines import FLUX_CALL, PIXART_CALL, flux_pipeline, pixart_sigma_pipeline
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single

PROMPTS = ["a red cat", "a blue dog on the grass"]


class HoldsPipeline(L.LightningModule):
    """``self.pipe`` is the only attribute: no submodule is registered. ``make`` builds (or loads) the pipeline,
    ``call`` are its call arguments."""

    def __init__(self, make=pixart_sigma_pipeline, call: dict = PIXART_CALL) -> None:
        super().__init__()
        self.pipe = make()
        self.pipe.set_progress_bar_config(disable=True)
        self.call = call

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return self.pipe(prompt=list(batch["prompt"]), generator=generators, **self.call).images


def loader() -> DataLoader:
    return prompt_loader(PROMPTS, batch_size=2)


def two_rank_strategies(text_encoder: str) -> dict:
    """The presets on 2 ranks, FSDP with the pipeline's ``text_encoder`` sharded too."""
    return {
        "ulysses2": lambda: SequenceParallelStrategy(ulysses_degree=2, start_method="fork"),
        "ring2": lambda: SequenceParallelStrategy(ring_degree=2, start_method="fork"),
        "cfg2": lambda: DiTParallelStrategy(cfg_degree=2, start_method="fork"),
        "pipeline2": lambda: PipelineStrategy(pp_degree=2, start_method="fork"),
        "fsdp_ulysses2_text_encoder": lambda: FSDPInferenceStrategy(
            ulysses_degree=2, shard_modules=[text_encoder], start_method="fork"
        ),
    }


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return predict_single(HoldsPipeline(), loader())


STRATEGIES = two_rank_strategies("pipe.text_encoder")


@pytest.mark.parametrize("name", STRATEGIES)
def test_pipeline_attribute_equals_one_process(name: str, reference, tmp_path: Path):
    outputs = predict_on_ranks(HoldsPipeline(), loader(), STRATEGIES[name](), 2, tmp_path)
    assert_exact(outputs, reference, name)


def flux_from(folder: Path):
    """``FluxPipeline.from_pretrained(folder)``: the module loads the pipeline by path (joint attention over 25 image
    and 9 text tokens)."""
    return lambda: FluxPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux")
    flux_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flux_reference(flux_folder: Path) -> torch.Tensor:
    return predict_single(HoldsPipeline(flux_from(flux_folder), FLUX_CALL), loader())


#: FLUX.1-dev is guidance-distilled: no CFG batch to split.
FLUX_STRATEGIES = {k: v for k, v in two_rank_strategies("pipe.text_encoder_2").items() if k != "cfg2"}


@pytest.mark.parametrize("name", FLUX_STRATEGIES)
def test_flux_pipeline_from_disk_equals_one_process(name: str, flux_folder: Path, flux_reference, tmp_path: Path):
    module = HoldsPipeline(flux_from(flux_folder), FLUX_CALL)
    outputs = predict_on_ranks(module, loader(), FLUX_STRATEGIES[name](), 2, tmp_path)
    assert_exact(outputs, flux_reference, f"flux {name}")


def test_attach_registers_components_and_detach_restores():
    module = HoldsPipeline()
    pipe = module.pipe
    attached = attach_pipelines(module, show_progress=False)
    try:
        assert isinstance(module.pipe, PipelineModule)
        assert module.get_submodule("pipe.transformer") is pipe.transformer
        assert module.pipe.scheduler is pipe.scheduler  # non-module components read through
        assert pipe._progress_bar_config["disable"] is True
    finally:
        attached.detach()
    assert module.pipe is pipe and "pipe" not in module._modules
    assert pipe._progress_bar_config == {"disable": True}  # as the builder set it


def test_pipelines_in_a_list_and_a_dict():
    module = L.LightningModule()
    first, second = pixart_sigma_pipeline(), pixart_sigma_pipeline(seed=1)
    module.pipes = [first, second]
    module.by_name = {"main": first}
    attached = attach_pipelines(module, show_progress=True)
    try:
        assert module.get_submodule("pipes.1.transformer") is second.transformer
        assert module.get_submodule("by_name.main.vae") is first.vae
    finally:
        attached.detach()
    assert module.pipes == [first, second] and module.by_name == {"main": first}
