"""``OrderedPredictionWriter`` (in memory) and ``StreamingPredictionWriter`` (to disk, per batch): every sample once,
in global-index order, equal to one process, also with uneven data. Interrupted and resumed streaming runs:
``tests/test_batch_job.py``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy
from lightning_dit_parallel.app.batch_job import StreamingPredictionWriter
from lightning_dit_parallel.app.batch_job.manifest import read_manifests
from lightning_dit_parallel.app.writer import OrderedPredictionWriter, contributors, order_predictions
from tests.models import build_dit, dit_sampler, requests
from tests.rank_outputs import assert_exact, predict_single


def run_with_writer(strategy, devices: int, n: int, batch_size: int, out: Path) -> dict:
    """Forked ``Trainer.predict`` with the writer; returns what rank 0 wrote."""
    writer = OrderedPredictionWriter(out, save_images=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(dit_sampler(build_dit(), steps=2), requests(n, batch_size), return_predictions=False)
    assert sorted(p.name for p in out.iterdir()) == ["predictions.pt"], "only rank 0 writes, and one file"
    return torch.load(out / "predictions.pt")


LAYOUTS = [
    (dict(dp_degree=2), 2, 7, 2),  # ranks get 4 and 3 samples
    (dict(dp_degree=4), 4, 7, 2),  # ranks get 2, 2, 2, 1 samples
    (dict(dp_degree=4), 4, 5, 1),  # ranks get 2, 1, 1, 1 batches of one
    (dict(dp_degree=2, ulysses_degree=2), 4, 7, 3),  # two ranks per data-parallel group hold the same samples
]


@pytest.mark.parametrize("degrees, devices, n, batch_size", LAYOUTS)
def test_every_sample_once_in_order_and_equal_to_one_process(tmp_path, degrees, devices, n, batch_size):
    reference = predict_single(dit_sampler(build_dit(), steps=2), requests(n, batch_size))
    written = run_with_writer(DiTParallelStrategy(**degrees, start_method="fork"), devices, n, batch_size, tmp_path)
    assert written["index"].tolist() == list(range(n))
    assert_exact([written["prediction"]], reference)


def test_one_process(tmp_path):
    writer = OrderedPredictionWriter(tmp_path / "out", save_images=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    predictions = trainer.predict(dit_sampler(build_dit(), steps=2), requests(5, 2))
    assert writer.indices.tolist() == list(range(5))
    torch.testing.assert_close(writer.predictions, torch.cat(predictions), rtol=0, atol=0)
    assert torch.load(tmp_path / "out" / "predictions.pt")["index"].tolist() == list(range(5))


def test_images_are_written_per_sample_and_as_grid(tmp_path):
    writer = OrderedPredictionWriter(tmp_path)
    images = torch.rand(3, 1, 4, 4)
    files = writer.write(torch.tensor([0, 5, 9]), images, tmp_path)
    assert {f.name for f in files} == {"predictions.pt", "grid.png", "00000.png", "00005.png", "00009.png"}
    assert all(f.exists() for f in files)


def test_contributors_pick_the_first_rank_of_each_data_parallel_rank():
    assert contributors([0, 1, 2, 3]) == [True, True, True, True]
    assert contributors([0, 0, 1, 1]) == [True, False, True, False]
    assert contributors([0, 1, 0, 1]) == [True, True, False, False]


def test_order_predictions_sorts_and_rejects_duplicates_and_missing():
    indices, values = order_predictions(torch.tensor([2, 0, 1]), torch.tensor([[20.0], [0.0], [10.0]]))
    assert indices.tolist() == [0, 1, 2] and values.flatten().tolist() == [0.0, 10.0, 20.0]
    with pytest.raises(RuntimeError, match=r"more than once: global indices \[1\]"):
        order_predictions(torch.tensor([1, 0, 1]), torch.zeros(3, 1))
    with pytest.raises(RuntimeError, match="Gathered 2 predictions, expected 3"):
        order_predictions(torch.tensor([0, 1]), torch.zeros(2, 1), expected=3)


def test_batch_without_indices_is_rejected(tmp_path):
    writer = OrderedPredictionWriter(tmp_path)
    with pytest.raises(ValueError, match="global sample indices under 'index'"):
        writer.write_on_batch_end(None, None, torch.zeros(2, 1), None, {"class_label": torch.zeros(2)}, 0, 0)
    with pytest.raises(ValueError, match="2 outputs for a batch of 3 samples"):
        writer.write_on_batch_end(None, None, torch.zeros(2, 1), None, {"index": torch.arange(3)}, 0, 0)


@pytest.mark.parametrize("degrees, devices, n, batch_size", LAYOUTS)
def test_streaming_writer_writes_every_sample_once_from_one_rank_per_data_parallel_group(
    tmp_path, degrees, devices, n, batch_size
):
    reference = predict_single(dit_sampler(build_dit(), steps=2), requests(n, batch_size))
    writer = StreamingPredictionWriter(tmp_path, save_images=False, progress=False)
    loader = writer.prepare(requests(n, batch_size), first_process=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DiTParallelStrategy(**degrees, start_method="fork"),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(dit_sampler(build_dit(), steps=2), loader, return_predictions=False)
    manifests = sorted(p.name for p in tmp_path.glob("manifest.rank*.jsonl"))
    dp = degrees["dp_degree"]
    assert manifests == [f"manifest.rank{r * (devices // dp)}.jsonl" for r in range(dp)], "one writer per dp group"
    assert sorted(i for i, _, _ in read_manifests(tmp_path)) == list(range(n))
    written = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert written["index"].tolist() == list(range(n))
    assert_exact([written["prediction"]], reference)
    one = torch.load(tmp_path / "tensors" / "00003.pt", weights_only=True)["prediction"]
    torch.testing.assert_close(one, written["prediction"][3], rtol=0, atol=0)
