"""``OrderedPredictionWriter``: every sample's prediction on rank 0, in global-index order, then written out.

Under data parallelism each data-parallel group predicts different samples; Lightning's predict sampler
(``UnrepeatedDistributedSampler``) gives the groups different counts when the sample count does not divide
evenly. All ranks of one model-parallel group hold the same batches and the same outputs, so exactly one rank
per data-parallel group contributes (the lowest global rank with that data-parallel rank). Rank 0 orders the
gathered outputs by the batch's global indices and checks that none is missing and none duplicated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from typing_extensions import override

from lightning_dit_parallel.app.images import save_grid, save_images
from lightning_dit_parallel.app.videos import save_videos
from lightning_dit_parallel.utils.logging import rank_zero_log


def _data_parallel_rank(trainer: pl.Trainer) -> int:
    """The rank the predict sampler was given (ranks sharing it see the same samples)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", trainer.global_rank))


def contributors(data_parallel_ranks: Sequence[int]) -> list[bool]:
    """For each global rank, whether it is the lowest global rank of its data-parallel rank."""
    seen: set[int] = set()
    chosen = []
    for dp_rank in data_parallel_ranks:
        chosen.append(dp_rank not in seen)
        seen.add(dp_rank)
    return chosen


def order_predictions(indices: Tensor, predictions: Tensor, expected: int | None = None) -> tuple[Tensor, Tensor]:
    """Sort ``predictions`` (N, ...) by ``indices`` (N,); raise if an index repeats or the count is not ``expected``."""
    unique, counts = torch.unique(indices, return_counts=True)
    duplicated = unique[counts > 1].tolist()
    if duplicated:
        raise RuntimeError(f"Samples predicted more than once: global indices {duplicated}.")
    if expected is not None and len(indices) != expected:
        raise RuntimeError(f"Gathered {len(indices)} predictions, expected {expected} (one per sample).")
    order = torch.argsort(indices)
    return indices[order], predictions[order]


class OrderedPredictionWriter(BasePredictionWriter):
    """Collects predictions per batch, gathers them on rank 0 at the end of the epoch, and writes them.

    After ``Trainer.predict``, rank 0 holds ``indices`` (N,) and ``predictions`` (N, ...) ordered by global
    index; other ranks hold ``None``. Files (rank 0 only, in ``output_dir`` when given): ``predictions.pt``
    (``{"index", "prediction"}``); for image predictions (N, C, H, W) in [0, 1] with C in (1, 3) ``grid.png`` and
    ``samples/<index>.png``; for videos (N, F, C, H, W) ``samples/<index>.mp4`` (``.gif`` without
    ``imageio-ffmpeg``), the frames as ``samples/<index>/<frame>.png`` and a grid of first frames; and, when the
    batches carry prompts (``text_key``), ``prompts.json`` (index -> prompt).

    Args:
        output_dir: folder for the files; ``None`` writes nothing (results stay on the writer).
        index_key: the batch key with the samples' global indices (B,).
        save_tensors: write ``predictions.pt``.
        save_images: write the grid and one PNG per sample.
        grid_columns: images per grid row.
        image_scale: nearest-neighbour enlargement of the saved PNGs; ``"auto"``: 4 for images under 64 pixels
            high, else 1.
        text_key: the batch key with the prompts written to ``prompts.json``.
        fps: frames per second of saved videos.
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        index_key: str = "index",
        save_tensors: bool = True,
        save_images: bool = True,
        grid_columns: int = 10,
        image_scale: int | Literal["auto"] = 4,
        text_key: str = "prompt",
        fps: int = 8,
    ) -> None:
        super().__init__(write_interval="batch_and_epoch")
        if grid_columns < 1 or (image_scale != "auto" and (not isinstance(image_scale, int) or image_scale < 1)):
            raise ValueError(
                f"grid_columns and image_scale must be >= 1 (or image_scale 'auto'), got {grid_columns}"
                f" and {image_scale!r}."
            )
        if fps < 1:
            raise ValueError(f"fps must be >= 1, got {fps}.")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.index_key = index_key
        self.save_tensors = save_tensors
        self.save_images = save_images
        self.grid_columns = grid_columns
        self.image_scale = image_scale
        self.text_key = text_key
        self.fps = fps
        self._local: list[tuple[Tensor, Tensor]] = []
        self._texts: dict[int, str] = {}
        self.indices: Tensor | None = None
        self.predictions: Tensor | None = None
        self.texts: dict[int, str] = {}
        self.files: list[Path] = []

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._local, self.indices, self.predictions, self.files = [], None, None, []
        self._texts, self.texts = {}, {}

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if dataloader_idx != 0:
            raise ValueError(
                f"{type(self).__name__} supports one predict dataloader, got dataloader_idx={dataloader_idx}."
            )
        if not isinstance(batch, dict) or self.index_key not in batch:
            keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"The batch needs global sample indices under {self.index_key!r}; it has {keys}.")
        if not isinstance(prediction, Tensor):
            raise TypeError(
                f"{type(self).__name__} gathers tensors; predict_step returned {type(prediction).__name__}."
            )
        indices = torch.as_tensor(batch[self.index_key]).reshape(-1).cpu()  # (B,)
        if prediction.shape[0] != indices.shape[0]:
            raise ValueError(
                f"predict_step returned {prediction.shape[0]} outputs for a batch of {indices.shape[0]} samples."
            )
        self._local.append((indices, prediction.detach().cpu()))
        texts = batch.get(self.text_key)
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            self._texts.update({int(i): str(t) for i, t in zip(indices.tolist(), texts)})

    @override
    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        indices, outputs = self._local_tensors()
        dataset = getattr(trainer.predict_dataloaders, "dataset", None)
        expected = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered = self._gather(trainer, indices, outputs)
            if gathered is None:
                return
            indices, outputs = gathered
        if outputs is None:  # no batch reached this process
            outputs = torch.empty(0)
        self.indices, self.predictions = order_predictions(indices, outputs, expected)
        self.texts = dict(sorted(self._texts.items()))
        if self.output_dir is not None:
            self.files = self.write(self.indices, self.predictions, self.output_dir)
            rank_zero_log(f"{type(self).__name__}: wrote {len(self.files)} files to {self.output_dir}")

    def _local_tensors(self) -> tuple[Tensor, Tensor | None]:
        if not self._local:
            return torch.empty(0, dtype=torch.long), None
        # (N_local,), (N_local, ...)
        return torch.cat([i for i, _ in self._local]), torch.cat([p for _, p in self._local])

    def _gather(self, trainer: pl.Trainer, indices: Tensor, outputs: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Gather (indices, outputs) of one rank per data-parallel group on rank 0; ``None`` on other ranks."""
        world = dist.get_world_size()
        # 1. Who contributes: the lowest global rank of each data-parallel rank. Every rank also sends its
        #    indices, so rank 0 can check that ranks sharing a data-parallel rank predicted the same samples.
        shared: list[Any] = [None] * world
        dist.all_gather_object(shared, (_data_parallel_rank(trainer), indices))  # world x (int, (N_r,))
        chosen = contributors([dp for dp, _ in shared])
        # 2. Only contributors send outputs; the others send None (their outputs are copies).
        payload = (indices, outputs, self._texts) if chosen[dist.get_rank()] else None
        received: list[Any] | None = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(payload, received, dst=0)  # world x ((N_r,), (N_r, ...)) on rank 0
        if dist.get_rank() != 0:
            return None
        first_of: dict[int, Tensor] = {}
        for rank, (dp_rank, rank_indices) in enumerate(shared):
            reference = first_of.setdefault(dp_rank, rank_indices)
            if not torch.equal(reference, rank_indices):
                raise RuntimeError(
                    f"Ranks with data-parallel rank {dp_rank} predicted different samples: "
                    f"{reference.tolist()} vs {rank_indices.tolist()} (rank {rank})."
                )
        for part in received:
            if part is not None:
                self._texts.update(part[2])
        parts = [p for p in received if p is not None and p[1] is not None]
        if not parts:
            return torch.empty(0, dtype=torch.long), torch.empty(0)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])  # (N,), (N, ...)

    def write(self, indices: Tensor, predictions: Tensor, output_dir: Path) -> list[Path]:
        """Write the ordered predictions (rank 0 only); returns the files written."""
        output_dir.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        if self.save_tensors:
            files.append(output_dir / "predictions.pt")
            torch.save({"index": indices, "prediction": predictions}, files[-1])
        names = [f"{i:05d}" for i in indices.tolist()]
        if self.save_images and predictions.ndim == 4 and predictions.shape[1] in (1, 3):
            scale = self._scale(predictions.shape[-2])
            files.append(save_grid(predictions, output_dir / "grid.png", self.grid_columns, scale))
            files += save_images(predictions, names, output_dir / "samples", scale)
        elif self.save_images and predictions.ndim == 5 and predictions.shape[2] in (1, 3):
            scale = self._scale(predictions.shape[-2])
            files.append(save_grid(predictions[:, 0], output_dir / "grid.png", self.grid_columns, scale))
            files += save_videos(predictions, names, output_dir / "samples", self.fps)
        if self.texts:
            files.append(output_dir / "prompts.json")
            files[-1].write_text(json.dumps({str(k): v for k, v in self.texts.items()}, indent=1, ensure_ascii=False))
        return files

    def _scale(self, height: int) -> int:
        if self.image_scale == "auto":
            return 4 if height < 64 else 1
        return int(self.image_scale)
