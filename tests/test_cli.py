"""The Hydra command line: every config composes and instantiates; ``ldp-predict`` runs end to end on 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lightning_dit_parallel.app.batch_job import StreamingPredictionWriter
from lightning_dit_parallel.app.cli import predict, single_run_argv
from lightning_dit_parallel.app.sampling import DiffusionSampler, PipelineSampler

CONF = Path(__file__).resolve().parents[1] / "lightning_dit_parallel" / "app" / "conf"
FAST = ["data.dataset.num_samples=4", "data.batch_size=2", "model.num_inference_steps=3"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_predict(overrides: list[str]):
    with initialize_config_module(config_module="lightning_dit_parallel.app.conf", version_base="1.3"):
        return compose(config_name="predict", overrides=overrides)


def test_every_group_has_options():
    for group in ("model", "strategy", "trainer", "data", "writer"):
        assert options(group), f"no configs in conf/{group}"
    assert {"ulysses", "ring", "usp", "none"} <= set(options("strategy"))


@pytest.mark.parametrize("strategy", options("strategy"))
def test_every_strategy_composes_and_instantiates_with_the_trainer(strategy):
    cfg = compose_predict([f"strategy={strategy}"])
    trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy))
    assert isinstance(trainer, L.Trainer)
    assert trainer.num_devices == cfg.trainer.devices


@pytest.mark.parametrize("group", ["model", "trainer", "data", "writer"])
def test_every_other_group_option_instantiates(group, tmp_path):
    if group == "model":  # model=pipeline loads a pipeline folder: give it a tiny one
        from tests.pipelines import pixart_sigma_pipeline

        pixart_sigma_pipeline().save_pretrained(tmp_path / "pipeline")
    required = {
        "model": {"pipeline": [f"model.path={tmp_path / 'pipeline'}"]},
        "data": {"prompts": ["data.prompts=[a red cat]"]},
    }
    for option in options(group):
        cfg = compose_predict([f"{group}={option}", *required.get(group, {}).get(option, [])])
        node = cfg[group]
        assert "_target_" in node, f"conf/{group}/{option}.yaml has no _target_"
        if group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            continue  # composes; instantiating needs CUDA
        kwargs = {"output_dir": str(tmp_path)} if group == "writer" else {}
        obj = instantiate(node, **kwargs)
        expected = {
            "model": PipelineSampler if option == "pipeline" else DiffusionSampler,
            "trainer": L.Trainer,
            "data": torch.utils.data.DataLoader,
            "writer": StreamingPredictionWriter,
        }[group]
        assert isinstance(obj, expected)


def test_multirun_relaunch_keeps_config_flags_and_the_job_overrides_only():
    argv = ["ldp-predict", "-m", "--config-name", "predict", "strategy=ulysses,ring", "trainer.devices=2"]
    assert single_run_argv(argv, ["strategy=ring", "trainer.devices=2"]) == [
        "ldp-predict",
        "--config-name",
        "predict",
        "strategy=ring",
        "trainer.devices=2",
    ]


def test_module_entry_point_composes_overrides():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_dit_parallel", "strategy=ring", "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "ring_degree: 2" in out and "ulysses_degree: 1" in out


def test_command_line_on_two_processes_writes_images_equal_to_one_process(tmp_path):
    """``ldp-predict`` (console script, 2 processes, Ulysses 2) versus the same config without a strategy."""
    script = Path(sys.executable).with_name("ldp-predict")
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(script), *FAST, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ulysses=2" in result.stdout and "quality:" in result.stdout
    assert result.stdout.count("layout:") == 1, "only rank 0 prints the summary"
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert samples == [f"{i:05d}.png" for i in range(4)]
    assert (run_dir / "grid.png").stat().st_size > 0
    assert not list(run_dir.glob("train_ddp_process_*")), "re-launched ranks write nothing"
    parallel = torch.load(run_dir / "predictions.pt")

    cfg = compose_predict(["strategy=none", *FAST])
    summary = predict(cfg, tmp_path / "single")
    single = torch.load(tmp_path / "single" / "predictions.pt")
    assert summary["samples"] == 4 and "SingleDeviceStrategy" in summary["layout"]
    assert parallel["index"].tolist() == single["index"].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(parallel["prediction"], single["prediction"], rtol=1e-5, atol=1e-5)
