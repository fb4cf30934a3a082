"""``StreamingPredictionWriter``: every sample on disk as soon as its batch is done; resumable; stops on signals.

Per batch, one rank of each data-parallel group (the lowest global rank with that data-parallel rank; the ranks of
a model-parallel group hold the same outputs) writes each sample's files atomically and then appends the batch to
its manifest (``manifest.py``), in a background thread while the next batch computes (at most ``max_pending``
batches wait). No rank keeps outputs: memory does not grow with the number of samples.

After every batch the ranks meet in one tiny all-gather on a gloo group of their own (``[signal, new samples]``
per rank): rank 0 counts the samples of all data-parallel groups for the progress line, and a stop signal received
by any rank stops every rank after the same batch. Data-parallel groups with one batch fewer (uneven counts) take
part in the remaining rounds after their last batch, so every rank runs the same number of rounds.

Files in ``output_dir``: ``samples/<index>.png`` per image (N, C, H, W) with C in (1, 3); for videos
(N, F, C, H, W) ``samples/<index>.mp4`` (``.gif`` without imageio-ffmpeg) and the frames
``samples/<index>/<frame>.png``; ``tensors/<index>.pt`` (``{"prediction": tensor}``) with ``save_tensors``;
``run.json`` and ``manifest.rank<k>.jsonl``. At the end, when ``collect`` allows (small runs), rank 0 also writes
the ordered ``predictions.pt`` (``{"index", "prediction"}``), ``grid.png`` (the first ``grid_samples``) and
``prompts.json``, reading the tensors back with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from typing_extensions import override

from lightning_dit_parallel.app.batch_job.files import (
    atomic_text,
    atomic_write,
    remove_temporaries,
    save_png,
    save_tensor,
    save_video_files,
)
from lightning_dit_parallel.app.batch_job.manifest import (
    ManifestAppender,
    check_run_file,
    finished_indices,
    read_manifests,
    write_run_file,
)
from lightning_dit_parallel.app.batch_job.progress import ProgressLine
from lightning_dit_parallel.app.batch_job.resume import ResumePoint, is_first_process, remaining_loader, resume_point
from lightning_dit_parallel.app.batch_job.stop import (
    DEFAULT_SIGNALS,
    PredictionInterrupted,
    StopSignals,
    stand_down_launcher_watchdog,
)
from lightning_dit_parallel.app.images import save_grid
from lightning_dit_parallel.app.known_warnings import silence_known_warnings
from lightning_dit_parallel.app.writer import _data_parallel_rank, contributors
from lightning_dit_parallel.utils.logging import log

Collect = Literal["auto"] | bool


def _checksum(indices: Sequence[int]) -> tuple[int, int, int]:
    """(count, sum, sum of squares) modulo 2**61: equal lists give equal sums on every rank."""
    mod = (1 << 61) - 1
    return len(indices), sum(indices) % mod, sum(i * i for i in indices) % mod


class StreamingPredictionWriter(BasePredictionWriter):
    """Streams every sample to ``output_dir`` as its batch finishes; resumes; stops every rank cleanly on a signal.

    Use: ``loader = writer.prepare(loader)`` in every process before ``trainer.predict(module, loader,
    return_predictions=False)`` (``ldp-predict`` does this). ``prepare`` checks ``run.json`` against ``run_config``
    (``RunConfigMismatch`` on a difference) and returns a loader over the samples not yet on disk. Without
    ``prepare`` the writer still streams and records, but does not skip finished samples.

    After ``Trainer.predict``, ``indices`` (N,) and, when collected, ``predictions`` (N, ...) in global-index order
    are set on global rank 0 (``predictions`` is ``None`` when not collected); ``done_before`` and ``written``
    count the samples found on disk and the samples this run wrote.

    Args:
        output_dir: the run folder (created).
        index_key: the batch key with the samples' global indices (B,).
        save_tensors: write ``tensors/<index>.pt`` per sample (needed for ``predictions.pt``).
        save_images: write ``samples/<index>.png`` (images) or ``.mp4`` and frames (videos).
        grid_columns: images per grid row.
        image_scale: nearest-neighbour enlargement of the saved PNGs; ``"auto"``: 4 below 64 pixels high, else 1.
        text_key: the batch key with prompts (recorded in the manifests, and in ``prompts.json`` when collected).
        fps: frames per second of saved videos.
        collect: write the ordered ``predictions.pt``, ``grid.png`` and ``prompts.json`` at the end (rank 0 reads
            every sample back, so its memory grows with the run): ``"auto"`` when all predictions take at most
            ``collect_limit_mb``, ``True`` always, ``False`` never.
        collect_limit_mb: the limit of ``collect="auto"``, in MiB of predictions.
        grid_samples: how many samples (the first) ``grid.png`` shows.
        resume: skip the samples a previous run in ``output_dir`` finished. ``False`` refuses a folder that holds
            finished samples (nothing is deleted or mixed).
        run_config: what determines the outputs (model, call arguments, seed, data ...), JSON-serialisable; stored in
            ``run.json`` and compared on every later run in the folder.
        stop_signals: signals that stop every rank after the current batch (add ``"SIGUSR1"`` for SLURM's
            ``--signal=USR1@<seconds>``). A second one stops at once.
        progress: show one progress line on rank 0.
        progress_interval_s: seconds between progress lines when the output is not a terminal.
        round_timeout_s: how long a rank waits for the other data-parallel groups at a batch boundary (a rank with
            one batch fewer waits a whole batch). A rank that dies is noticed at once, not after this time.
        durable: ``fsync`` every manifest line (survives a power loss; a killed process loses nothing without it).
        background: write in a background thread, overlapping the next batch (``False``: in the loop).
        max_pending: with ``background``, batches handed to the thread and not yet written, at most; the loop waits
            beyond (this bounds the writer's memory to that many batches of outputs).
    """

    def __init__(
        self,
        output_dir: str | Path,
        index_key: str = "index",
        save_tensors: bool = True,
        save_images: bool = True,
        grid_columns: int = 10,
        image_scale: int | Literal["auto"] = "auto",
        text_key: str = "prompt",
        fps: int = 8,
        collect: Collect = "auto",
        collect_limit_mb: float = 256.0,
        grid_samples: int = 100,
        resume: bool = True,
        run_config: Mapping[str, Any] | None = None,
        stop_signals: Sequence[str | int] = DEFAULT_SIGNALS,
        progress: bool = True,
        progress_interval_s: float = 30.0,
        round_timeout_s: float = 3600.0,
        durable: bool = False,
        background: bool = True,
        max_pending: int = 2,
    ) -> None:
        super().__init__(write_interval="batch")
        if output_dir is None:
            raise ValueError("StreamingPredictionWriter needs an output_dir.")
        if grid_columns < 1 or grid_samples < 0 or fps < 1 or collect_limit_mb < 0 or round_timeout_s <= 0:
            raise ValueError(
                f"grid_columns, fps and round_timeout_s must be positive and grid_samples, "
                f"collect_limit_mb >= 0; got {grid_columns}, {fps}, {round_timeout_s}, {grid_samples}, "
                f"{collect_limit_mb}."
            )
        if image_scale != "auto" and (not isinstance(image_scale, int) or image_scale < 1):
            raise ValueError(f"image_scale must be an int >= 1 or 'auto', got {image_scale!r}.")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}.")
        if collect not in ("auto", True, False):
            raise ValueError(f"collect must be 'auto', true or false, got {collect!r}.")
        if collect is True and not save_tensors:
            raise ValueError("collect=true reads the per-sample tensors back: it needs save_tensors=true.")
        self.output_dir = Path(output_dir)
        self.index_key = index_key
        self.save_tensors = save_tensors
        self.save_images = save_images
        self.grid_columns = grid_columns
        self.image_scale = image_scale
        self.text_key = text_key
        self.fps = fps
        self.collect = collect
        self.collect_limit_mb = collect_limit_mb
        self.grid_samples = grid_samples
        self.resume = resume
        self.run_config = dict(run_config or {})
        self.stop = StopSignals(stop_signals)
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.round_timeout_s = round_timeout_s
        self.durable = durable
        self.background = background
        self.max_pending = max_pending
        self.point: ResumePoint | None = None
        self.indices: Tensor | None = None
        self.predictions: Tensor | None = None
        self.done_before = 0
        self.written = 0
        self.write_seconds = 0.0  # this rank's time writing files and manifest lines (in the background thread)
        self.hook_seconds = 0.0  # the loop's time in the writer: checks, copies, waiting for the thread
        self.round_seconds = 0.0  # this rank's time in the per-batch agreement (includes waiting for peers)
        self._reset_run_state()
        silence_known_warnings()

    def _reset_run_state(self) -> None:
        self._group: Any = None
        self._world = 1
        self._rank = 0
        self._writes = True
        self._rounds = 0
        self._round = 0
        self._manifest: ManifestAppender | None = None
        self._progress_line: ProgressLine | None = None
        self._total = 0
        self._padding: frozenset[int] = frozenset()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._stopping = False

    # -- before Trainer.predict, in every process -----------------------------------------------------------

    def prepare(
        self, loader: torch.utils.data.DataLoader, first_process: bool | None = None, min_samples: int = 1
    ) -> torch.utils.data.DataLoader:
        """Check the folder and return a loader over the samples not yet on disk (``loader`` when none is done).

        Call it in every process before ``trainer.predict``, before any process group exists: every rank then
        computes the same remaining list. The first process (global rank 0; default: from the launcher's rank
        variables) also writes ``run.json`` and removes temporary files an interrupted run left. ``min_samples``
        (the world size, or the number of data-parallel groups): when fewer samples remain, finished ones are
        predicted again, and not written, so that every data-parallel group has one.

        Raises:
            RunConfigMismatch: ``run.json`` records another ``run_config``.
            FileExistsError: ``resume=False`` and the folder holds finished samples.
        """
        first_process = is_first_process() if first_process is None else first_process
        total = len(loader.dataset)  # type: ignore[arg-type]
        recorded = check_run_file(self.output_dir, self.run_config)
        finished = {i for i in finished_indices(self.output_dir) if 0 <= i < total}
        if finished and not self.resume:
            raise FileExistsError(
                f"{self.output_dir} holds {len(finished)} finished samples of an earlier run and resume is off; "
                "use another output folder, or resume (ldp-predict: writer.resume=true)."
            )
        self.point = point = resume_point(total, finished, min_samples)
        remaining = point.remaining
        if remaining:  # a signal from here on (model loading, process groups) stops the run before its first batch
            self.stop.install()
        if first_process:
            if recorded is None or recorded.get("num_samples") != total:
                write_run_file(self.output_dir, self.run_config, total)
            remove_temporaries(self.output_dir, self.output_dir / "samples", self.output_dir / "tensors")
            if finished:
                log.info(
                    f"Resuming in {self.output_dir}: {len(finished)} of {total} samples are done, "
                    f"{len(remaining)} to go."
                )
        return remaining_loader(loader, point.requests, self.index_key)

    # -- during Trainer.predict -------------------------------------------------------------------------------

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_run_state()
        self.indices, self.predictions, self.written = None, None, 0
        self.write_seconds = self.hook_seconds = self.round_seconds = 0.0
        dataset = getattr(trainer.predict_dataloaders, "dataset", None)
        point = self.point
        if point is None or dataset is None or len(dataset) != len(point.requests):  # no prepare(): nothing skipped
            count = len(dataset) if dataset is not None else 0
            point = self.point = ResumePoint(count, 0, tuple(range(count)))
        self._total, self.done_before, self._padding = point.total, point.done, frozenset(point.padding)
        batches = int(trainer.num_predict_batches[0]) if trainer.num_predict_batches else 0
        self._rank = trainer.global_rank
        saved = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(saved, dict):  # installed by prepare(): Lightning saved ours as the handlers to restore
            self.stop.hand_back_through(saved)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._world = dist.get_world_size()
            # A gloo group of our own: CPU tensors whatever the strategy's backend, and a timeout that lets a rank
            # with one batch fewer wait a whole batch for the others (a dead peer still fails it at once).
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.round_timeout_s))
            self.stop.install()  # before the first collective: a signal during it is seen in the first round
            mine = torch.tensor(
                [_data_parallel_rank(trainer), batches, self.stop.received or 0, *_checksum(point.requests)]
            )  # (6,)
            everyone = [torch.zeros_like(mine) for _ in range(self._world)]
            dist.all_gather(everyone, mine, group=self._group)  # world x (6,)
            table = torch.stack(everyone).tolist()
            if len({tuple(row[3:]) for row in table}) != 1:
                raise RuntimeError(
                    f"The ranks see different remaining samples in {self.output_dir} (count, checksums per rank: "
                    f"{[row[3:] for row in table]}): is another run writing into it, or is it not one folder shared by "
                    "every node?"
                )
            self._writes = contributors([row[0] for row in table])[self._rank]
            self._rounds = max(row[1] for row in table)
            early = [(rank, row[2]) for rank, row in enumerate(table) if row[2]]
        else:
            self.stop.install()
            self._rounds = batches
            early = [(0, self.stop.received)] if self.stop.received else []
        if early:  # a signal while the model loaded: every rank stops before the first batch
            self.stop.restore()
            stand_down_launcher_watchdog()
            raise PredictionInterrupted(
                f"Stopped by {signal.Signals(early[0][1]).name} (received by rank "
                f"{', '.join(str(r) for r, _ in early)}) before the first batch; nothing was computed. Run the same "
                "command again to start.",
                early[0][1],
            )
        if self._writes:
            self._manifest = ManifestAppender(self.output_dir, self._rank, self.durable)
            if self.background:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="ldp-writer")
        if self._rank == 0 and self.progress:
            self._progress_line = ProgressLine(point.total, point.done, interval_s=self.progress_interval_s)

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
        new = 0
        if self._writes:
            start = time.perf_counter()
            job = self._batch_job(prediction, batch)
            if self._executor is None:
                new = self._write_files(*job)
            else:
                self._pending.append(self._executor.submit(self._write_files, *job))
                while len(self._pending) > self.max_pending:  # the thread is behind: wait for its oldest batch
                    new += self._pending.popleft().result()
                new += self._written_since()
            self.hook_seconds += time.perf_counter() - start
        self._agree(new)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        while self._round < self._rounds:  # this data-parallel group had fewer batches: meet the others' rounds
            self._agree(self._written_since())
        self._agree(self._drain(), final=True)  # every rank's files are complete after this round

    def _written_since(self) -> int:
        """Samples of the batches the thread finished since the last call (its errors are raised here)."""
        count = 0
        while self._pending and self._pending[0].done():
            count += self._pending.popleft().result()
        return count

    def _drain(self) -> int:
        """Wait for every pending batch; returns their sample count."""
        start = time.perf_counter()
        count = 0
        while self._pending:
            count += self._pending.popleft().result()
        self.hook_seconds += time.perf_counter() - start
        return count

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if trainer.global_rank == 0:
            self.finish()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        for future in self._pending:  # the batches already computed still reach the disk
            future.exception()
        self._pending.clear()
        self._close()

    def _close(self) -> None:
        self.stop.restore()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._progress_line is not None:
            self._progress_line.close()
            self._progress_line = None
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        if self._group is not None:
            group, self._group = self._group, None
            try:
                dist.destroy_process_group(group)
            except Exception:  # the default group is gone already (its teardown destroys every group)
                pass

    def _agree(self, new: int, final: bool = False) -> None:
        """One round: every rank reports (signal, new samples); all stop together if any rank got a signal (not in
        the ``final`` round, after the last batch: the run is complete)."""
        start = time.perf_counter()
        received = self.stop.received or 0
        if self._group is not None:
            mine = torch.tensor([received, new])  # (2,)
            everyone = [torch.zeros_like(mine) for _ in range(self._world)]
            dist.all_gather(everyone, mine, group=self._group)  # world x (2,)
            rows = torch.stack(everyone).tolist()
        else:
            rows = [[received, new]]
        self._round += 1
        self.round_seconds += time.perf_counter() - start
        self.written += sum(n for _, n in rows)
        if self._progress_line is not None:
            self._progress_line.update(sum(n for _, n in rows))
        signalled = [(rank, signum) for rank, (signum, _) in enumerate(rows) if signum]
        if not signalled or final:
            if signalled and not self._stopping and self._rank == 0:
                log.info(f"{signal.Signals(signalled[0][1]).name} arrived after the last batch: the run is complete.")
            return
        if self._round >= self._rounds:  # the last batch's round: the run completes (the final round follows)
            return
        self._stopping = True
        self._agree(self._drain(), final=True)  # every rank: its batches on disk and counted, then stop
        signum = signalled[0][1]
        done = self.done_before + self.written
        stand_down_launcher_watchdog()
        raise PredictionInterrupted(
            f"Stopped by {signal.Signals(signum).name} (received by rank {', '.join(str(r) for r, _ in signalled)}) "
            f"after {done} of {self._total} samples; every finished sample is in {self.output_dir}. Run the same "
            "command again (same output folder) to resume: finished samples are skipped.",
            signum,
        )

    # -- files -------------------------------------------------------------------------------------------------

    def write_batch(self, prediction: Any, batch: Any) -> int:
        """Write one batch's samples (each file atomically), then its manifest line; returns the sample count."""
        return self._write_files(*self._batch_job(prediction, batch))

    def _batch_job(self, prediction: Any, batch: Any) -> tuple[list[int], Tensor, list[str] | None]:
        """Check a batch and take what the files need: (indices, predictions on the CPU, prompts), padding removed."""
        if not isinstance(batch, dict) or self.index_key not in batch:
            keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"The batch needs global sample indices under {self.index_key!r}; it has {keys}.")
        if not isinstance(prediction, Tensor):
            raise TypeError(f"{type(self).__name__} writes tensors; predict_step returned {type(prediction).__name__}.")
        indices = torch.as_tensor(batch[self.index_key]).reshape(-1).tolist()  # (B,)
        if prediction.shape[0] != len(indices):
            raise ValueError(
                f"predict_step returned {prediction.shape[0]} outputs for a batch of {len(indices)} samples."
            )
        prediction = prediction.detach().to("cpu", copy=True)  # (B, ...): the thread's own copy
        texts = batch.get(self.text_key)
        prompts = None if texts is None else [str(t) for t in ([texts] if isinstance(texts, str) else texts)]
        keep = [j for j, index in enumerate(indices) if index not in self._padding]  # padding: on disk already
        if len(keep) < len(indices):
            indices = [indices[j] for j in keep]
            prediction = prediction[keep]
            prompts = None if prompts is None else [prompts[j] for j in keep]
        return indices, prediction, prompts

    def _write_files(self, indices: list[int], prediction: Tensor, prompts: list[str] | None) -> int:
        """The files of each sample, then the batch's manifest line (the background thread runs this)."""
        if not indices:
            return 0
        start = time.perf_counter()
        files = [self._write_sample(index, sample) for index, sample in zip(indices, prediction)]
        if self._manifest is None:  # outside Trainer.predict (tests, tools): open this rank's manifest now
            self._manifest = ManifestAppender(self.output_dir, self._rank, self.durable)
        self._manifest.append(indices, files, prompts)
        self.write_seconds += time.perf_counter() - start
        return len(indices)

    def _write_sample(self, index: int, sample: Tensor) -> list[str]:
        """``sample`` (...) of global ``index``; returns its files relative to ``output_dir``."""
        name = f"{index:05d}"
        written: list[Path] = []
        if self.save_tensors:
            written.append(save_tensor(sample, self.output_dir / "tensors" / f"{name}.pt"))
        if self.save_images and sample.ndim == 3 and sample.shape[0] in (1, 3):  # (C, H, W)
            written.append(save_png(sample, self.output_dir / "samples" / f"{name}.png", self._scale(sample.shape[-2])))
        elif self.save_images and sample.ndim == 4 and sample.shape[1] in (1, 3):  # (F, C, H, W)
            written += save_video_files(sample, self.output_dir / "samples", name, self.fps)
        return [str(p.relative_to(self.output_dir)) for p in written]

    def _scale(self, height: int) -> int:
        if self.image_scale == "auto":
            return 4 if height < 64 else 1
        return int(self.image_scale)

    # -- after Trainer.predict, on global rank 0 ----------------------------------------------------------------

    def finish(self) -> list[Path]:
        """Check that every sample of the job is on disk, then write the collected files when ``collect`` allows.

        Called on global rank 0 after ``Trainer.predict`` (and by ``ldp-predict`` when nothing was left to do).
        Returns the collected files written.

        Raises:
            RuntimeError: samples of the job have no outputs (their indices are named).
        """
        total = self.point.total if self.point is not None else 0
        seen = bytearray(total)
        for index, _, _ in read_manifests(self.output_dir):
            if 0 <= index < total:
                seen[index] = 1
        missing = [i for i in range(total) if not seen[i]]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {total} samples have no outputs in {self.output_dir}: global indices "
                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}."
            )
        self.indices = torch.arange(total)
        files: list[Path] = []
        if total and self._should_collect(total):
            files = self._write_collected(total)
        log.info(
            f"{type(self).__name__}: {total} samples in {self.output_dir} ({self.written} written by this run"
            f"{', ordered predictions.pt and grid.png' if files else ''})."
        )
        return files

    def _should_collect(self, total: int) -> bool:
        if self.collect is False or not self.save_tensors:
            return False
        if self.collect is True:
            return True
        first = self.output_dir / "tensors" / f"{0:05d}.pt"
        return first.exists() and first.stat().st_size * total <= self.collect_limit_mb * 2**20

    def _write_collected(self, total: int) -> list[Path]:
        tensors = self.output_dir / "tensors"
        predictions = torch.stack(
            [
                torch.load(tensors / f"{i:05d}.pt", weights_only=True, map_location="cpu")["prediction"]
                for i in range(total)
            ]
        )  # (N, ...)
        self.predictions = predictions
        files = [
            atomic_write(
                self.output_dir / "predictions.pt",
                lambda tmp: torch.save({"index": self.indices, "prediction": predictions}, tmp),
            )
        ]
        shown = predictions[: self.grid_samples]
        if self.grid_samples and shown.ndim == 5:  # videos: their first frames
            shown = shown[:, 0]
        if self.grid_samples and shown.ndim == 4 and shown.shape[1] in (1, 3):
            scale = self._scale(shown.shape[-2])
            files.append(
                atomic_write(self.output_dir / "grid.png", lambda tmp: save_grid(shown, tmp, self.grid_columns, scale))
            )
        prompts = {index: prompt for index, _, prompt in read_manifests(self.output_dir) if prompt is not None}
        if prompts:
            text = json.dumps({str(k): prompts[k] for k in sorted(prompts)}, indent=1, ensure_ascii=False)
            files.append(atomic_text(self.output_dir / "prompts.json", text))
        return files
