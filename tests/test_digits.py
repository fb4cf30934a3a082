"""The embedded digits DiT: data, shipped weights, the quality scorer and the quality of the default sampler."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from safetensors.torch import load_file

from lightning_dit_parallel.app.digits import DigitRequests, digit_images, load_digits_dit
from lightning_dit_parallel.app.digits.model import DIGITS_DIT_CONFIG, WEIGHTS_FILE, read_metadata, weights_dir
from lightning_dit_parallel.app.digits.quality import class_accuracy, digit_classifier
from lightning_dit_parallel.app.digits.train import DigitsDiTTraining, save_weights


def test_training_images_are_16x16_in_minus_one_to_one():
    images, labels = digit_images()
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() >= -1 and images.max() <= 1 and images.min() == -1 and images.max() == 1
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_requests_cycle_through_the_classes():
    requests = DigitRequests(12)
    assert [requests[i]["class_label"].item() for i in range(12)] == [i % 10 for i in range(12)]
    assert [requests[i]["index"].item() for i in range(12)] == list(range(12))
    with pytest.raises(ValueError, match="num_samples and num_classes must be >= 1, got 0 and 10"):
        DigitRequests(0)


def test_classifier_knows_real_digits_and_rejects_noise():
    assert digit_classifier().holdout_accuracy >= 0.97
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert class_accuracy(noise, torch.arange(200) % 10) < 0.3


def test_shipped_weights_load_with_their_config():
    meta = read_metadata()
    assert meta["transformer"] == DIGITS_DIT_CONFIG
    model = load_digits_dit()
    heads = model.config.num_attention_heads
    assert heads % 2 == 0 and heads % 4 == 0, "Ulysses degrees 2 and 4 need heads divisible by them"
    assert (weights_dir() / WEIGHTS_FILE).stat().st_size < 5 * 2**20


def test_training_writes_weights_the_loader_reads(tmp_path):
    tiny = dict(DIGITS_DIT_CONFIG, num_layers=1, attention_head_dim=8)
    module = DigitsDiTTraining(config=tiny)
    images, labels = digit_images()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:16], labels[:16]), batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    save_weights(module, tmp_path, {"steps": trainer.global_step})
    loaded = load_digits_dit(tmp_path)
    for name, tensor in load_file(str(tmp_path / WEIGHTS_FILE)).items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert read_metadata(tmp_path)["training"] == {"steps": 2}


def test_default_sampler_draws_the_requested_digits():
    """The default command-line model: 100 samples, 10 per class; at least 90% classified as requested."""
    with initialize_config_module(config_module="lightning_dit_parallel.app.conf", version_base="1.3"):
        cfg = compose(config_name="predict")
    sampler = instantiate(cfg.model)
    requests = DigitRequests(100)
    batch = {"index": torch.arange(100), "class_label": torch.stack([requests[i]["class_label"] for i in range(100)])}
    images = sampler.sample(batch)
    assert images.shape == (100, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert class_accuracy(images, batch["class_label"]) >= 0.9
