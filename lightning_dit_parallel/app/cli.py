"""``ldp-predict``: the Hydra command line that samples with ``Trainer.predict`` under a parallel strategy.

The configs live in ``lightning_dit_parallel/app/conf`` (groups ``model``, ``strategy``, ``trainer``, ``data``,
``writer``). Lightning's default launcher starts the other ranks by re-running this command with
``hydra.run.dir`` set to the same run directory; only global rank 0 writes the logs and reports.

The run folder is ``output_dir=<folder>`` (default: a new dated folder). Samples stream into it as batches finish
(``batch_job.StreamingPredictionWriter``); running the same command with the same ``output_dir`` again resumes:
finished samples are skipped, and a changed model, data or output configuration is refused. SIGTERM and SIGINT stop
every rank after the current batch, with exit code 128 + the signal number and the command that resumes.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write

from lightning_dit_parallel.app.batch_job import PredictionInterrupted, RunConfigMismatch, StreamingPredictionWriter
from lightning_dit_parallel.app.batch_job.resume import is_first_process
from lightning_dit_parallel.app.known_warnings import silence_known_warnings

#: Command-line flags of a Hydra app that take a value and must reach the ranks Lightning starts.
_FLAGS_WITH_VALUE = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")

__all__ = ["is_first_process", "main", "predict", "run_config", "single_run_argv"]


def rank_log_file(output_dir: str, job_name: str) -> str:
    """Hydra's log file for this process: ``<run dir>/<job>.log`` on global rank 0, ``os.devnull`` on every other
    rank (those Lightning re-launches and those torchrun or srun start on any node): they write no files."""
    if not is_first_process():
        return os.devnull
    return str(Path(output_dir) / f"{job_name}.log")


def rank_output_subdir(subdir: str) -> str | None:
    """Hydra's config copy (``.hydra/``) on global rank 0 only; ``None`` (none) on the other ranks."""
    return subdir if is_first_process() else None


def run_dir(output_dir: str | None, default: str) -> str:
    """Hydra's run directory: ``output_dir`` when given (a rerun there resumes), else ``default`` (a new folder)."""
    return default if output_dir in (None, "") else str(output_dir)


OmegaConf.register_new_resolver("ldp_rank_log_file", rank_log_file, replace=True)
OmegaConf.register_new_resolver("ldp_rank_output_subdir", rank_output_subdir, replace=True)
OmegaConf.register_new_resolver("ldp_run_dir", run_dir, replace=True)

#: Writer options that change the files of a sample (compared on resume, with the model and the data).
_OUTPUT_OPTIONS = ("index_key", "save_tensors", "save_images", "image_scale", "fps", "text_key")


def _approximate(strategy: dict[str, Any]) -> bool:
    """Whether the strategy's outputs depend on its layout (PipeFusion, DistriFusion, or auto allowing them)."""
    target = str(strategy.get("_target_", ""))
    pipeline = strategy.get("pipeline") or {}
    auto = strategy.get("auto")
    return (
        "pipefusion" in (strategy.get("mode"), strategy.get("pp_mode"), pipeline.get("mode"))
        or target.endswith("PatchParallelStrategy")
        or strategy.get("distrifusion") is not None
        or bool(strategy.get("allow_approximate"))
        or (isinstance(auto, dict) and bool(auto.get("allow_approximate")))
    )


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """What determines the outputs of a run, recorded in ``run.json`` and compared when the folder is reused: the
    model (weights, call arguments, seed ...), the data (requests, batch size) and the writer's file options. An
    exact strategy gives the same samples whatever the layout, so a run may resume on other degrees or another
    device count; an approximate one (PipeFusion, DistriFusion) is recorded too."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    writer = resolved.get("writer") or {}
    config = {
        "model": resolved.get("model"),
        "data": resolved.get("data"),
        "writer": {k: writer[k] for k in _OUTPUT_OPTIONS if k in writer},
    }
    strategy = resolved.get("strategy") or {}
    if _approximate(strategy):
        config["strategy"] = strategy
    return config


class PredictTimer(L.Callback):
    """Wall time of the prediction loop alone (without process start-up and model loading)."""

    def __init__(self) -> None:
        self.seconds = float("nan")
        self._start = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_predict_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._start


def describe_layout(strategy) -> str:
    """The parallel layout of a strategy after ``predict`` (``"single process"`` without one)."""
    layout = getattr(strategy, "_layout", None)
    if layout is not None:
        ranks_per_node = strategy.num_processes if getattr(strategy, "num_nodes", 1) > 1 else None
        return f"{layout.describe(ranks_per_node)} on {strategy.world_size} ranks"
    processes = getattr(strategy, "world_size", 1)
    return f"{type(strategy).__name__} on {processes} process{'es' if processes > 1 else ''}"


def single_run_argv(argv: list[str], task_overrides: list[str]) -> list[str]:
    """The command line of one job of a multirun, for the ranks Lightning re-launches.

    Lightning re-runs ``sys.argv`` with ``hydra.run.dir`` appended; in a multirun that would start the whole
    sweep again in every rank. Keep the config flags, drop ``-m``/``--multirun`` and the sweep, and pass this
    job's own overrides instead.
    """
    kept: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if arg in _FLAGS_WITH_VALUE:
            kept += [arg, next(args, "")]
        elif any(arg.startswith(flag + "=") for flag in _FLAGS_WITH_VALUE):
            kept.append(arg)
    return [argv[0], *kept, *task_overrides]


def _prepare_relaunch(output_dir: str) -> None:
    """In a multirun, make Lightning's launcher start the other ranks on this job, in this job's directory."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = single_run_argv(sys.argv, list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = output_dir


def predict(cfg: DictConfig, output_dir: Path) -> dict | None:
    """Instantiate the configured objects, run ``Trainer.predict`` on the samples not yet in ``output_dir`` and, on
    rank 0, return the summary.

    Every process reads ``output_dir`` before any process group exists (``StreamingPredictionWriter.prepare``), so
    every rank skips the same finished samples; when none is left, no process group is made at all.
    """
    silence_known_warnings()
    requests = instantiate(cfg.data)
    # not recursive: the recorded model and data configs carry _target_ keys that must stay plain values
    writer = instantiate(
        cfg.writer, output_dir=str(output_dir), run_config=run_config(cfg), _recursive_=False, _convert_="all"
    )
    if not isinstance(writer, StreamingPredictionWriter):
        raise TypeError(
            f"ldp-predict streams and resumes with StreamingPredictionWriter; writer is {type(writer).__name__}."
        )
    loader = writer.prepare(requests, first_process=is_first_process(), min_samples=_world_size(cfg))
    assert writer.point is not None
    timer = PredictTimer()
    layout, total = "nothing left to do", 0.0
    if writer.point.remaining:
        module = instantiate(cfg.model)
        strategy = instantiate(cfg.strategy)
        trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=[writer, timer])
        start = time.perf_counter()
        trainer.predict(module, loader, return_predictions=False)
        total = time.perf_counter() - start
        if trainer.global_rank != 0:
            return None
        layout = describe_layout(trainer.strategy)
    elif is_first_process():
        timer.seconds = 0.0
        writer.finish()
    else:
        return None
    summary = {
        "layout": layout,
        "samples": writer.point.total,
        "new": writer.written,
        "before": writer.point.done,
        "seconds": timer.seconds,
        "total_seconds": total,
        "grid": str(output_dir / "grid.png"),
        "collected": writer.predictions is not None,
    }
    if (
        cfg.get("score") is not None
        and writer.predictions is not None
        and _requests_have(requests.dataset, cfg.score.get("label_key"))
    ):
        summary["score"] = instantiate(cfg.score)(writer.predictions, requests.dataset, writer.indices)
    return summary


def _world_size(cfg: DictConfig) -> int:
    """``trainer.devices * trainer.num_nodes`` when both are integers (1 otherwise): the most data-parallel groups."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else 1


def resume_command(output_dir: Path) -> str:
    """The command that resumes this run: the same overrides, with ``output_dir`` set to this run's folder."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.split("=", 1)[0].lstrip("+~") == "output_dir"]
    return shlex.join(["ldp-predict", *overrides, f"output_dir={output_dir.resolve()}"])


def _requests_have(dataset, key: str | None) -> bool:
    """Whether the requests carry ``key`` (the digits score needs class labels; prompt requests have none, so
    ``ldp-predict model=pipeline`` reports no score)."""
    if key is None:
        return True
    try:
        return key in dataset[0]
    except (TypeError, IndexError, KeyError):
        return False


@hydra.main(config_path="conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Entry point of ``ldp-predict`` and ``python -m lightning_dit_parallel``; returns the score on rank 0."""
    silence_known_warnings()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    _prepare_relaunch(str(output_dir))
    try:
        summary = predict(cfg, output_dir)
    except PredictionInterrupted as stop:
        if is_first_process():
            print(f"{stop}\nResume with:\n  {resume_command(output_dir)}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except (RunConfigMismatch, FileExistsError):  # the folder was refused before anything ran
        raise
    except Exception:
        if is_first_process() and any(output_dir.glob("manifest.rank*.jsonl")):
            print(
                f"The run failed; every finished sample is in {output_dir}. After fixing the cause, resume with:\n"
                f"  {resume_command(output_dir)}",
                file=sys.stderr,
                flush=True,
            )
        raise
    if summary is None:
        return None
    before = f" ({summary['before']} done before, {summary['new']} by this run)" if summary["before"] else ""
    files = f"{summary['grid']} and {output_dir / 'samples'}/" if summary["collected"] else f"{output_dir / 'samples'}/"
    lines = [
        f"layout:  {summary['layout']}",
        f"time:    {summary['samples']} samples{before} in {summary['seconds']:.2f} s of prediction loop "
        f"({summary['total_seconds']:.2f} s for Trainer.predict with process start-up)",
        f"images:  {files}",
    ]
    if "score" in summary:
        lines.append(f"quality: {summary['score']:.3f} (share classified as the requested digit)")
    print("\n".join(lines))
    return summary.get("score")
