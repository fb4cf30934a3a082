"""Collect what ``predict_step`` returned on every rank of a forked ``Trainer.predict``.

Strategies that fork do not return predictions to the parent process, and the tests must check every
rank anyway: each rank saves its outputs to ``<dir>/rank<global_rank>.pt``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankOutputs(L.Callback):
    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)
        self.outputs: list[torch.Tensor] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.outputs.append(outputs.detach().cpu())

    def on_predict_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.outputs, self.dirpath / f"rank{trainer.global_rank}.pt")


def load_rank_outputs(dirpath: Path, world_size: int) -> list[torch.Tensor]:
    """Every rank's outputs, concatenated over batches, in rank order."""
    files = [Path(dirpath) / f"rank{r}.pt" for r in range(world_size)]
    missing = [str(f) for f in files if not f.exists()]
    assert not missing, f"ranks wrote no outputs: {missing}"
    return [torch.cat(torch.load(f)) for f in files]


def predict_on_ranks(module: L.LightningModule, loader, strategy, devices: int, dirpath: Path) -> list[torch.Tensor]:
    """``Trainer.predict`` on ``devices`` CPU processes; returns every rank's outputs."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveRankOutputs(dirpath)],
    )
    trainer.predict(module, loader, return_predictions=False)
    return load_rank_outputs(dirpath, devices)


def predict_single(module: L.LightningModule, loader) -> torch.Tensor:
    """The one-process reference output."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return torch.cat(trainer.predict(module, loader))


def max_relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference|."""
    return ((output - reference).abs().max() / reference.abs().max()).item()


def assert_exact(outputs: list[torch.Tensor], reference: torch.Tensor, what: str = "") -> float:
    """Every rank's output equals the one-process reference: float32, max error <= 1e-5 of its largest value.

    Returns the largest relative error; ``what`` prefixes the failure messages.
    """
    prefix = f"{what}, " if what else ""
    errors = []
    for rank, out in enumerate(outputs):
        assert out.shape == reference.shape, (
            f"{prefix}rank {rank}: shape {tuple(out.shape)} != {tuple(reference.shape)}"
        )
        errors.append(max_relative_error(out, reference))
        assert errors[-1] <= 1e-5, f"{prefix}rank {rank}: max relative error {errors[-1]:.2e}"
    return max(errors)
