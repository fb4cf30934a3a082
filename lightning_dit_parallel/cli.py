"""``ldp-predict``: the Hydra command line that samples with ``Trainer.predict`` under a parallel strategy.

The configs live in ``lightning_dit_parallel/conf`` (groups ``model``, ``strategy``, ``trainer``, ``data``,
``writer``). Lightning's default launcher starts the other ranks by re-running this command with
``hydra.run.dir`` set to the same run directory; only global rank 0 writes files and reports.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write

#: Command-line flags of a Hydra app that take a value and must reach the ranks Lightning starts.
_FLAGS_WITH_VALUE = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


#: Variables in which launchers give a process its place before Lightning runs: torchrun (``RANK``, ``GROUP_RANK``),
#: srun (``SLURM_PROCID``), Lightning's launcher (``NODE_RANK`` on every node, ``LOCAL_RANK`` on the ranks it starts).
_RANK_VARIABLES = ("RANK", "GROUP_RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


def is_first_process() -> bool:
    """Whether this process will be global rank 0: every rank variable a launcher set is 0 (or none is set)."""
    return all(int(os.environ.get(name) or 0) == 0 for name in _RANK_VARIABLES)


def rank_log_file(output_dir: str, job_name: str) -> str:
    """Hydra's log file for this process: ``<run dir>/<job>.log`` on global rank 0, ``os.devnull`` on every other
    rank (those Lightning re-launches and those torchrun or srun start on any node): they write no files."""
    if not is_first_process():
        return os.devnull
    return str(Path(output_dir) / f"{job_name}.log")


def rank_output_subdir(subdir: str) -> str | None:
    """Hydra's config copy (``.hydra/``) on global rank 0 only; ``None`` (none) on the other ranks."""
    return subdir if is_first_process() else None


OmegaConf.register_new_resolver("ldp_rank_log_file", rank_log_file, replace=True)
OmegaConf.register_new_resolver("ldp_rank_output_subdir", rank_output_subdir, replace=True)


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
    """Instantiate the configured objects, run ``Trainer.predict`` and, on rank 0, return the summary."""
    module = instantiate(cfg.model)
    loader = instantiate(cfg.data)
    writer = instantiate(cfg.writer, output_dir=str(output_dir))
    strategy = instantiate(cfg.strategy)
    timer = PredictTimer()
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=[writer, timer])
    start = time.perf_counter()
    trainer.predict(module, loader, return_predictions=False)
    total = time.perf_counter() - start
    if trainer.global_rank != 0:
        return None
    summary = {"layout": describe_layout(trainer.strategy), "samples": len(writer.indices), "seconds": timer.seconds,
               "total_seconds": total, "grid": str(output_dir / "grid.png")}
    if cfg.get("score") is not None and _requests_have(loader.dataset, cfg.score.get("label_key")):
        summary["score"] = instantiate(cfg.score)(writer.predictions, loader.dataset, writer.indices)
    return summary


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
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    _prepare_relaunch(str(output_dir))
    summary = predict(cfg, output_dir)
    if summary is None:
        return None
    lines = [
        f"layout:  {summary['layout']}",
        f"time:    {summary['samples']} samples in {summary['seconds']:.2f} s of prediction loop "
        f"({summary['total_seconds']:.2f} s for Trainer.predict with process start-up)",
        f"images:  {summary['grid']} and {output_dir / 'samples'}/",
    ]
    if "score" in summary:
        lines.append(f"quality: {summary['score']:.3f} (share classified as the requested digit)")
    print("\n".join(lines))
    return summary.get("score")
