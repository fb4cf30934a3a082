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

from lightning_dit_parallel import DiTParallelStrategy, FSDPInferenceStrategy, PipelineStrategy, SequenceParallelStrategy
from lightning_dit_parallel.pipelines import PipelineModule, attach_pipelines
from lightning_dit_parallel.prompts import prompt_loader
from tests.pipelines import FLUX_CALL, PIXART_CALL, flux_pipeline, pixart_sigma_pipeline
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single

PROMPTS = ["a red cat", "a blue dog on the grass"]


class HoldsPipeline(L.LightningModule):
    """``self.pipe`` is the only attribute: no submodule is registered."""

    def __init__(self) -> None:
        super().__init__()
        self.pipe = pixart_sigma_pipeline()

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return self.pipe(prompt=list(batch["prompt"]), generator=generators, **PIXART_CALL).images


def loader() -> DataLoader:
    return prompt_loader(PROMPTS, batch_size=2)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return predict_single(HoldsPipeline(), loader())


STRATEGIES = {
    "ulysses2": lambda: SequenceParallelStrategy(ulysses_degree=2, start_method="fork"),
    "ring2": lambda: SequenceParallelStrategy(ring_degree=2, start_method="fork"),
    "cfg2": lambda: DiTParallelStrategy(cfg_degree=2, start_method="fork"),
    "pipeline2": lambda: PipelineStrategy(pp_degree=2, start_method="fork"),
    "fsdp_ulysses2_text_encoder": lambda: FSDPInferenceStrategy(
        ulysses_degree=2, shard_modules=["pipe.text_encoder"], start_method="fork"
    ),
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_pipeline_attribute_equals_one_process(name: str, reference, tmp_path: Path):
    outputs = predict_on_ranks(HoldsPipeline(), loader(), STRATEGIES[name](), 2, tmp_path)
    assert_exact(outputs, reference, name)


class HoldsFluxFromDisk(L.LightningModule):
    """``self.pipe = FluxPipeline.from_pretrained(path)``: joint attention over 25 image and 9 text tokens."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.pipe = FluxPipeline.from_pretrained(path)
        self.pipe.set_progress_bar_config(disable=True)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return self.pipe(prompt=list(batch["prompt"]), generator=generators, **FLUX_CALL).images


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux")
    flux_pipeline().save_pretrained(folder)
    return folder


FLUX_STRATEGIES = {
    "ulysses2": lambda: SequenceParallelStrategy(ulysses_degree=2, start_method="fork"),
    "ring2": lambda: SequenceParallelStrategy(ring_degree=2, start_method="fork"),
    "pipeline2": lambda: PipelineStrategy(pp_degree=2, start_method="fork"),
    "fsdp_ulysses2_t5": lambda: FSDPInferenceStrategy(
        ulysses_degree=2, shard_modules=["pipe.text_encoder_2"], start_method="fork"
    ),
}


@pytest.mark.parametrize("name", FLUX_STRATEGIES)
def test_flux_pipeline_from_disk_equals_one_process(name: str, flux_folder: Path, tmp_path: Path):
    reference = predict_single(HoldsFluxFromDisk(flux_folder), loader())
    outputs = predict_on_ranks(HoldsFluxFromDisk(flux_folder), loader(), FLUX_STRATEGIES[name](), 2, tmp_path)
    assert_exact(outputs, reference, f"flux {name}")


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
