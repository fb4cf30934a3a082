"""Batch jobs lose nothing: outputs stream to disk, an interrupted run resumes, a signal stops every rank.

Multi-rank runs use ``run_on_ranks`` with ``Trainer.predict`` in place (as under torchrun, ``tests/in_process.py``):
a rank sends itself SIGTERM or SIGINT inside ``predict_step``, or dies with SIGKILL; the same ranks (or a new
launch) then run the same job again in the same folder, and the final ordered outputs must equal the one-process
reference, every sample exactly once in the manifests, no temporary file left. ``test_cli_batch_job.py`` does the
same through ``ldp-predict`` and Lightning's launcher.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy
from lightning_dit_parallel.app.batch_job import PredictionInterrupted, RunConfigMismatch, StreamingPredictionWriter
from lightning_dit_parallel.app.batch_job.files import TMP_MARK, atomic_write, remove_temporaries
from lightning_dit_parallel.app.batch_job.manifest import (
    ManifestAppender,
    check_run_file,
    finished_indices,
    read_manifests,
    write_run_file,
)
from lightning_dit_parallel.app.batch_job.progress import ProgressLine
from lightning_dit_parallel.app.batch_job.resume import remaining_loader
from lightning_dit_parallel.app.batch_job.stop import parse_signals
from lightning_dit_parallel.app.known_warnings import silence_known_warnings
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch
from tests.models import build_dit, dit_sampler, requests
from tests.rank_outputs import assert_exact, predict_single

STEPS = 2
TIMEOUT_S = 10.0


def assert_complete(out: Path, n: int, reference: torch.Tensor) -> None:
    """``out`` holds exactly samples 0..n-1, once each, complete, equal to the reference."""
    recorded = sorted(index for index, _, _ in read_manifests(out))
    assert recorded == list(range(n)), f"manifests record {recorded}, expected each of 0..{n - 1} once"
    leftovers = [p for p in out.rglob(f"{TMP_MARK}*")]
    assert not leftovers, f"temporary files left: {leftovers}"
    tensors = sorted(p.name for p in (out / "tensors").iterdir())
    assert tensors == [f"{i:05d}.pt" for i in range(n)]
    written = torch.load(out / "predictions.pt", weights_only=True)
    assert written["index"].tolist() == list(range(n))
    assert_exact([written["prediction"]], reference)


# -- pieces, no process group ---------------------------------------------------------------------------------


def test_manifest_ignores_an_incomplete_last_line_and_samples_whose_files_are_gone(tmp_path):
    (tmp_path / "tensors").mkdir()
    for i in (0, 1, 2):
        (tmp_path / "tensors" / f"{i:05d}.pt").write_bytes(b"x")
    appender = ManifestAppender(tmp_path, 0)
    appender.append([0, 1], [["tensors/00000.pt"], ["tensors/00001.pt"]], None)
    appender.append([2, 3], [["tensors/00002.pt"], ["tensors/00003.pt"]], ["a", "b"])  # 3's file is missing
    appender.close()
    with open(tmp_path / "manifest.rank0.jsonl", "a") as file:
        file.write('{"indices": [4, 5], "fil')  # killed while appending
    assert finished_indices(tmp_path) == {0, 1, 2}
    appender = ManifestAppender(tmp_path, 0)  # ends the broken line first
    appender.append([4], [[]], None)
    appender.close()
    assert finished_indices(tmp_path) == {0, 1, 2, 4}
    assert [p for _, _, p in read_manifests(tmp_path)] == [None, None, "a", "b", None]


def test_run_file_refuses_another_configuration_and_names_the_differences(tmp_path):
    config = {"model": {"seed": 0, "steps": 25}, "data": {"num_samples": 20}}
    assert check_run_file(tmp_path, config) is None
    write_run_file(tmp_path, config, 20)
    assert check_run_file(tmp_path, config)["num_samples"] == 20
    changed = {"model": {"seed": 1, "steps": 25}, "data": {"num_samples": 20, "batch_size": 2}}
    with pytest.raises(RunConfigMismatch, match=r"model\.seed: 0 -> 1.*|data\.batch_size: \"<absent>\" -> 2") as err:
        check_run_file(tmp_path, changed)
    assert "model.seed: 0 -> 1" in str(err.value) and 'data.batch_size: "<absent>" -> 2' in str(err.value)


def test_atomic_write_leaves_no_partial_file_and_temporaries_are_removed(tmp_path):
    def fails(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "a.pt", fails)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / f"{TMP_MARK}123-b.pt").write_bytes(b"left by a killed process")
    (tmp_path / f"{TMP_MARK}123-c-frames").mkdir()
    (tmp_path / "keep.png").write_bytes(b"")
    assert remove_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_remaining_loader_keeps_the_batching_and_checks_indices():
    loader = requests(7, batch_size=3)
    rest = remaining_loader(loader, [1, 4, 5, 6])
    assert [b["index"].tolist() for b in rest] == [[1, 4, 5], [6]]
    assert remaining_loader(loader, list(range(7))) is loader
    shifted = torch.utils.data.DataLoader([{"index": torch.tensor(i + 10)} for i in range(3)], batch_size=2)
    with pytest.raises(ValueError, match="equals their position"):
        remaining_loader(shifted, [1])


def test_signal_names_and_progress_text():
    assert parse_signals(["SIGTERM", "usr1", int(signal.SIGINT)]) == (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    with pytest.raises(ValueError, match=r"\['SIGNOPE', 'SIGKILL'\]"):
        parse_signals(["SIGNOPE", "SIGKILL"])
    line = ProgressLine(total=400, done_before=80)
    assert line.text().startswith("samples 80/400 (20%, 80 before this run) | ? samples/s")
    line._start -= 10.0
    line.done += 40
    assert line.text() == "samples 120/400 (30%, 80 before this run) | 4.00 samples/s | 1:10 left"


def test_known_lightning_warning_is_filtered_and_others_are_not():
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        _tree_flatten({"index": [1, 2]})
        warnings.warn("a user warning", UserWarning)
    assert [str(w.message) for w in caught] == ["a user warning"]


# -- one process -------------------------------------------------------------------------------------------------


class SignalAtBatch(L.Callback):
    """Sends this process ``signum`` when batch ``batch_idx`` starts (the batch still finishes)."""

    def __init__(self, signum: int, batch_idx: int) -> None:
        self.signum, self.batch_idx = signum, batch_idx

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), self.signum)


def one_process_run(out: Path, n: int, batch_size: int, callbacks=(), **writer_options) -> StreamingPredictionWriter:
    writer = StreamingPredictionWriter(out, save_images=False, progress=False, run_config={"n": n}, **writer_options)
    loader = writer.prepare(requests(n, batch_size), first_process=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer, *callbacks],
    )
    trainer.predict(dit_sampler(build_dit(), steps=STEPS), loader, return_predictions=False)
    return writer


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_one_process_stops_after_the_batch_and_resumes_to_the_uninterrupted_outputs(tmp_path, signum):
    n = 7
    reference = predict_single(dit_sampler(build_dit(), steps=STEPS), requests(n, 2))
    handler = signal.getsignal(signum)
    with pytest.raises(PredictionInterrupted, match=f"Stopped by {signum.name}.* after 4 of 7 samples") as stop:
        one_process_run(tmp_path, n, 2, [SignalAtBatch(signum, 1)])
    assert stop.value.exit_code == 128 + signum
    assert signal.getsignal(signum) is handler, "the previous handler is back"
    assert finished_indices(tmp_path) == {0, 1, 2, 3}
    assert not (tmp_path / "predictions.pt").exists()
    writer = one_process_run(tmp_path, n, 2)
    assert (writer.done_before, writer.written) == (4, 3)
    assert_complete(tmp_path, n, reference)
    with pytest.raises(FileExistsError, match="holds 7 finished samples"):
        StreamingPredictionWriter(tmp_path, resume=False, run_config={"n": n}).prepare(requests(n, 2))


def test_a_signal_while_the_model_loads_stops_before_the_first_batch(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    writer = StreamingPredictionWriter(tmp_path, save_images=False, progress=False, run_config={"n": 3})
    loader = writer.prepare(requests(3, 1), first_process=True)
    os.kill(os.getpid(), signal.SIGINT)  # after prepare, before predict: recorded, no KeyboardInterrupt anywhere
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    with pytest.raises(PredictionInterrupted, match="Stopped by SIGINT .* before the first batch") as stop:
        trainer.predict(dit_sampler(build_dit(), steps=STEPS), loader, return_predictions=False)
    assert stop.value.exit_code == 130 and finished_indices(tmp_path) == set()
    assert signal.getsignal(signal.SIGINT) is handler, "the previous handler is back"


class SlowWriter(StreamingPredictionWriter):
    """Its thread takes longer per batch than the loop: the loop has to wait for it at ``max_pending``."""

    def _write_files(self, *job):
        time.sleep(0.2)
        return super()._write_files(*job)


def _run_with_a_slow_writer(rank: int, world: int, out: str, n: int) -> int:
    writer = SlowWriter(out, save_images=False, progress=False, run_config={"n": n}, max_pending=1)
    loader = writer.prepare(requests(n, 1), first_process=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(dit_sampler(build_dit(), steps=STEPS), loader, return_predictions=False)
    return writer.written


def test_a_writer_thread_behind_the_loop_holds_it_back_and_counts_every_sample(tmp_path):
    n = 9
    reference = predict_single(dit_sampler(build_dit(), steps=STEPS), requests(n, 1))
    # In a process of its own: a loop that never stops waiting fails the test after the timeout instead of hanging.
    assert run_on_ranks(1, _run_with_a_slow_writer, str(tmp_path), n, timeout_s=60) == [n]
    assert_complete(tmp_path, n, reference)


def test_collect_false_keeps_rank_zero_free_of_outputs(tmp_path):
    writer = one_process_run(tmp_path, 3, 2, collect=False)
    assert writer.predictions is None and writer.indices.tolist() == [0, 1, 2]
    assert not (tmp_path / "predictions.pt").exists() and len(list((tmp_path / "tensors").iterdir())) == 3


# -- several ranks, in place (as under torchrun) -----------------------------------------------------------------


def _job(
    rank: int,
    world: int,
    port: int,
    out: str,
    degrees: dict,
    n: int,
    batch_size: int,
    fault: tuple[str, int, int] | None,
) -> dict:
    """One run of the job on this rank; ``fault`` = (what, rank, batch_idx): a signal to self, or SIGKILL."""
    module = dit_sampler(build_dit(), steps=STEPS)
    if fault is not None and fault[1] == rank:
        plain_step = module.predict_step

        def predict_step(batch, batch_idx):
            if batch_idx == fault[2]:
                os.kill(os.getpid(), getattr(signal, fault[0]))  # SIGKILL ends here; the others finish the batch
            return plain_step(batch, batch_idx)

        module.predict_step = predict_step
    with external_launch(rank, world, port, None):  # a peer may be dead: no group of all ranks on exit
        writer = StreamingPredictionWriter(out, save_images=False, progress=False, run_config={"n": n})
        loader = writer.prepare(requests(n, batch_size), first_process=rank == 0, min_samples=world)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=DiTParallelStrategy(**degrees, timeout=TIMEOUT_S),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[writer],
        )
        start = time.monotonic()
        try:
            trainer.predict(module, loader, return_predictions=False)
            outcome = "done"
        except PredictionInterrupted as stop:
            outcome = f"stopped:{stop.exit_code}"
        except BaseException as err:  # noqa: BLE001 - the outcome is the error's kind
            outcome = type(err).__name__
    return {"outcome": outcome, "seconds": time.monotonic() - start, "remaining": len(writer.point.remaining)}


CASES = {
    # 2 ranks, dp 2, 5 samples in batches of 1: 3 and 2 batches; rank 1 gets SIGTERM in its last batch
    "dp2-sigterm": (dict(dp_degree=2), 2, 5, 1, ("SIGTERM", 1, 1)),
    # 4 ranks, dp 2 x ulysses 2, 7 samples: 4 and 3 batches; a rank of the second dp group gets SIGINT
    "dp2xulysses2-sigint": (dict(dp_degree=2, ulysses_degree=2), 4, 7, 1, ("SIGINT", 3, 1)),
    # 4 ranks, dp 4, 9 samples in batches of 2: 2, 1, 1, 1 batches; rank 0 gets SIGTERM in its first batch
    "dp4-sigterm": (dict(dp_degree=4), 4, 9, 2, ("SIGTERM", 0, 0)),
}


@pytest.mark.parametrize("case", CASES)
def test_interrupted_ranks_stop_together_and_a_rerun_gives_the_uninterrupted_outputs(case, tmp_path):
    degrees, world, n, batch_size, fault = CASES[case]
    reference = predict_single(dit_sampler(build_dit(), steps=STEPS), requests(n, batch_size))
    environment = dict(os.environ)
    first = run_on_ranks(world, _job, free_port(), str(tmp_path), degrees, n, batch_size, fault, timeout_s=60)
    code = 128 + getattr(signal, fault[0])
    assert [r["outcome"] for r in first] == [f"stopped:{code}"] * world, first
    done = finished_indices(tmp_path)
    assert 0 < len(done) < n
    again = run_on_ranks(world, _job, free_port(), str(tmp_path), degrees, n, batch_size, None, timeout_s=60)
    assert [r["outcome"] for r in again] == ["done"] * world, again
    assert [r["remaining"] for r in again] == [n - len(done)] * world
    assert_complete(tmp_path, n, reference)
    assert not multiprocessing.active_children() and dict(os.environ) == environment


def test_a_killed_rank_makes_the_others_fail_within_the_timeout_and_the_rerun_completes(tmp_path):
    n, degrees = 6, dict(dp_degree=2)
    reference = predict_single(dit_sampler(build_dit(), steps=STEPS), requests(n, 1))
    first = run_on_ranks(
        2, _job, free_port(), str(tmp_path), degrees, n, 1, ("SIGKILL", 1, 1), timeout_s=60, reporting=[0]
    )
    assert first[0]["outcome"] not in ("done", "stopped:143") and first[0]["seconds"] < TIMEOUT_S + 15, first
    # Rank 0 (indices 0, 2, 4) wrote its two batches: the second one on its way out. Rank 1's first batch (index 1)
    # may have died with it in its writer thread: SIGKILL loses the batches not yet written, at most max_pending.
    assert {0, 2} <= finished_indices(tmp_path) <= {0, 1, 2}
    again = run_on_ranks(2, _job, free_port(), str(tmp_path), degrees, n, 1, None, timeout_s=60)
    assert [r["outcome"] for r in again] == ["done", "done"], again
    assert_complete(tmp_path, n, reference)
    assert json.loads((tmp_path / "run.json").read_text())["num_samples"] == n
