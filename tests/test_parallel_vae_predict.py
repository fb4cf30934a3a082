"""``Trainer.predict`` with ``parallel_vae=True``: a LightningModule that holds a diffusers pipeline as a plain
attribute and calls ``self.pipe(...)`` (denoising, then ``vae.decode``) gets the one-process images, and its VAE
decoded in bands (the decoder's mid block saw half of the latent's rows on each rank)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dit_parallel import DiTParallelStrategy, SequenceParallelStrategy
from lightning_dit_parallel.app.prompts import prompt_loader
from tests.pipelines import PIXART_CALL, pixart_sigma_pipeline
from tests.rank_outputs import assert_exact, predict_on_ranks, predict_single

PROMPTS = ["a red cat", "a blue dog on the grass"]


class DecodesWithPipeline(L.LightningModule):
    """``self.pipe`` is the only attribute; ``probe_dir``: where each rank writes the heights its decoder's mid block
    saw (``None``: no probe)."""

    def __init__(self, probe_dir: Path | None = None) -> None:
        super().__init__()
        self.pipe = pixart_sigma_pipeline()
        self.probe_dir = probe_dir
        self.heights: list[int] = []
        self._probe = None

    def on_predict_start(self) -> None:
        if self.probe_dir is not None:
            mid = self.pipe.vae.decoder.mid_block
            self._probe = mid.register_forward_pre_hook(lambda m, args, *rest: self.heights.append(args[0].shape[-2]))

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return self.pipe(prompt=list(batch["prompt"]), generator=generators, **PIXART_CALL).images

    def on_predict_end(self) -> None:
        if self._probe is not None:
            self._probe.remove()
            Path(self.probe_dir, f"heights{self.global_rank}.json").write_text(json.dumps(self.heights))


def loader() -> DataLoader:
    return prompt_loader(PROMPTS, batch_size=2)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return predict_single(DecodesWithPipeline(), loader())


#: name -> (strategy, processes); with dp 2 each data-parallel group decodes its own prompt over its 2 ranks
STRATEGIES = {
    "ulysses2": (lambda: SequenceParallelStrategy(ulysses_degree=2, parallel_vae=True, start_method="fork"), 2),
    "cfg2": (lambda: DiTParallelStrategy(cfg_degree=2, parallel_vae=True, start_method="fork"), 2),
    "dp2_ulysses2": (
        lambda: DiTParallelStrategy(dp_degree=2, ulysses_degree=2, parallel_vae=True, start_method="fork"),
        4,
    ),
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_predict_with_parallel_vae_equals_one_process(name: str, reference, tmp_path: Path):
    strategy, devices = STRATEGIES[name]
    outputs = predict_on_ranks(DecodesWithPipeline(tmp_path), loader(), strategy(), devices, tmp_path)
    if devices == 4:  # ranks of dp group i hold sample i
        outputs = [torch.cat([outputs[0], outputs[2]]), torch.cat([outputs[1], outputs[3]])]
    assert_exact(outputs, reference, name)
    latent_height = PIXART_CALL["height"] // 2  # the tiny VAE's 2x compression
    for rank in range(devices):
        heights = json.loads(Path(tmp_path, f"heights{rank}.json").read_text())
        assert heights == [latent_height // 2], f"rank {rank}: the decoder's mid block saw {heights} rows"
