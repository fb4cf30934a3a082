"""``ldp-predict model=pipeline``: a tiny pipeline saved with ``save_pretrained`` and loaded back by path, under
several strategies; every PNG equals (within 1/255) plain diffusers called per prompt with the documented
generator ``torch.Generator("cpu").manual_seed(seed + i)``. A video pipeline writes playable files whose frames equal
the tensor returned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dit_parallel.app.sampling import PipelineSampler, load_pipeline
from lightning_dit_parallel.testing.videos import read_video
from tests.pipelines import PIXART_CALL, TEXT_TOKENS, WAN_CALL, pixart_sigma_pipeline, wan_pipeline

PROMPTS = ["a red cat", "a blue dog on the grass"]
SEED = 3


def run_predict(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("ldp-predict")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(script), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def pipeline_overrides(path: Path, call: dict) -> list[str]:
    listed = {"num_inference_steps", "guidance_scale", "height", "width", "num_frames", "max_sequence_length"}
    out = [
        "model=pipeline",
        f"model.path={path}",
        "data=prompts",
        f"data.prompts=[{','.join(PROMPTS)}]",
        f"model.seed={SEED}",
        "writer.image_scale=1",
    ]
    for key, value in call.items():
        if key == "output_type":
            continue
        value = str(value).lower() if isinstance(value, bool) else value
        out.append(f"{'' if key in listed else '+'}model.call.{key}={value}")
    return out


def plain_diffusers(path: Path, call: dict) -> list[torch.Tensor]:
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    for i, prompt in enumerate(PROMPTS):
        result = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(SEED + i), **call)
        outputs.append((result.images if hasattr(result, "images") else result.frames)[0])
    return outputs


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def quantized(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) as the writer rounds it."""
    return (image.clamp(0, 1) * 255).round().to(torch.int16).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def pixart(tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    path = tmp_path_factory.mktemp("pixart") / "pipeline"
    pixart_sigma_pipeline().save_pretrained(path)
    return path, plain_diffusers(path, PIXART_CALL)


STRATEGIES = {
    "none": [],
    "ulysses": ["strategy=ulysses"],
    "cfg": ["strategy=cfg"],
    "pipeline": ["strategy=pipeline"],
    "fsdp": ["strategy=fsdp", "strategy.shard_modules=[pipe.text_encoder]"],
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pixart_sigma_from_disk_equals_plain_diffusers(strategy, pixart, tmp_path):
    path, reference = pixart
    strategy_overrides = STRATEGIES[strategy] if strategy != "none" else ["strategy=none"]
    result = run_predict(tmp_path / "run", [*pipeline_overrides(path, PIXART_CALL), *strategy_overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "prompts.json").read_text()) == {str(i): p for i, p in enumerate(PROMPTS)}
    assert "quality:" not in result.stdout  # the digits score needs class labels
    for i, image in enumerate(reference):
        written = png(run / "samples" / f"{i:05d}.png")
        assert written.shape[:2] == tuple(image.shape[1:])
        assert np.abs(written - quantized(image)).max() <= 1, f"{strategy}: sample {i} differs from plain diffusers"


def test_wan_video_from_disk_writes_playable_files_equal_to_the_tensor(tmp_path):
    path = tmp_path / "wan"
    wan_pipeline().save_pretrained(path)
    reference = plain_diffusers(path, WAN_CALL)
    run = tmp_path / "run"
    result = run_predict(run, [*pipeline_overrides(path, WAN_CALL), "strategy=ulysses"])
    assert result.returncode == 0, result.stderr[-3000:]
    returned = torch.load(run / "predictions.pt")["prediction"]  # (N, F, C, H, W)
    assert returned.shape == (2, 5, 3, 32, 32)
    for i, video in enumerate(reference):
        torch.testing.assert_close(returned[i], video, rtol=1e-4, atol=1e-4)
        frames = np.stack([quantized(f) for f in returned[i]])  # (F, H, W, C)
        decoded = read_video(run / "samples" / f"{i:05d}.mp4").numpy().astype(np.int16)
        assert decoded.shape == frames.shape and np.array_equal(decoded, frames), "the MP4 is lossless"
        for f in range(frames.shape[0]):
            assert np.array_equal(png(run / "samples" / f"{i:05d}" / f"{f:04d}.png"), frames[f])
    assert (run / "grid.png").exists()


def test_sampler_seeds_by_index_whatever_the_batch(tmp_path):
    """In one process: the batch of two equals the two prompts alone, and a pipeline object works like a path."""
    pipe = pixart_sigma_pipeline()
    call = {k: v for k, v in PIXART_CALL.items() if k != "output_type"}
    sampler = PipelineSampler(pipe, call=call, seed=SEED)
    batch = sampler.predict_step({"index": torch.tensor([0, 1]), "prompt": PROMPTS}, 0)
    for i in range(2):
        alone = sampler.predict_step({"index": torch.tensor([i]), "prompt": [PROMPTS[i]]}, 0)
        torch.testing.assert_close(batch[i], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="either a pipeline object or a path"):
        PipelineSampler()
    with pytest.raises(ValueError, match=r"\['generator'\] are set by PipelineSampler"):
        PipelineSampler(pipe, call={"generator": None, "height": 16})
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        PipelineSampler(path=tmp_path)
    assert TEXT_TOKENS == call["max_sequence_length"]
