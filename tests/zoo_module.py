"""A LightningModule holding many zoo models: one ``Trainer.predict`` launch checks them all under one layout."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tests.zoo import ZooCase


class ZooModule(L.LightningModule):
    """``predict_step`` runs every case's forward on its seeded inputs and returns ``{case name: prediction}``.

    The strategy finds each model by its plan (they are the outermost planned submodules) and parallelizes all.
    """

    def __init__(self, cases: list[ZooCase]) -> None:
        super().__init__()
        self.cases = list(cases)
        self.models = nn.ModuleDict({_key(c.name): c.build() for c in self.cases})

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        outputs = {}
        for case in self.cases:
            model = self.models[_key(case.name)]
            with torch.no_grad():
                outputs[case.name] = case.output(model(**case.inputs(model))).float()
        return outputs


def _key(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def zoo_loader() -> DataLoader:
    """One batch (the inputs come from the cases, not the data)."""
    return DataLoader(torch.arange(1), batch_size=1)


class SaveRankDicts(L.Callback):
    """Each rank saves its ``{case: prediction}`` to ``<dir>/rank<global_rank>.pt``."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)
        self.outputs: dict[str, Tensor] = {}

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.outputs.update({k: v.detach().cpu() for k, v in outputs.items()})

    def on_predict_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.outputs, self.dirpath / f"rank{trainer.global_rank}.pt")


def predict_zoo(cases: list[ZooCase], strategy, devices: int, dirpath: Path) -> list[dict[str, Tensor]]:
    """Every rank's ``{case: prediction}`` from one ``Trainer.predict`` on ``devices`` CPU processes."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveRankDicts(dirpath)],
    )
    trainer.predict(ZooModule(cases), zoo_loader(), return_predictions=False)
    files = [Path(dirpath) / f"rank{r}.pt" for r in range(devices)]
    missing = [str(f) for f in files if not f.exists()]
    assert not missing, f"ranks wrote no outputs: {missing}"
    return [torch.load(f) for f in files]


def predict_zoo_single(cases: list[ZooCase]) -> dict[str, Tensor]:
    """The one-process reference of every case, through ``Trainer.predict``."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (outputs,) = trainer.predict(ZooModule(cases), zoo_loader())
    return outputs
