"""``ldp-predict`` as a batch job under Lightning's launcher (2 processes, data parallel, uneven counts): SIGTERM to the
launching process, then Ctrl-C (SIGINT to the whole process group) on the rerun, then a rerun to the end; the final
outputs equal one uninterrupted process's. Also: a changed configuration is refused before anything starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from hydra import compose, initialize_config_module

from lightning_dit_parallel.app.batch_job import RunConfigMismatch
from lightning_dit_parallel.app.batch_job.files import TMP_MARK
from lightning_dit_parallel.app.batch_job.manifest import finished_indices, read_manifests
from lightning_dit_parallel.app.cli import predict

N = 201  # odd: the two data-parallel groups get 101 and 100 samples
JOB = [
    f"data.dataset.num_samples={N}",
    "data.batch_size=2",
    "model.num_inference_steps=3",
    "strategy.ulysses_degree=1",
]  # two processes, dp=2
WAIT_S = 120


def compose_predict(overrides: list[str]):
    with initialize_config_module(config_module="lightning_dit_parallel.app.conf", version_base="1.3"):
        return compose(config_name="predict", overrides=overrides)


def processes_in(run_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def start(run_dir: Path, **extra_env: str) -> subprocess.Popen:
    script = Path(sys.executable).with_name("ldp-predict")
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra_env)
    return subprocess.Popen(
        [str(script), *JOB, f"output_dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def interrupt_after_new_batches(process: subprocess.Popen, run_dir: Path, before: int, to_group: bool) -> tuple:
    """Wait until both ranks wrote a batch more than ``before`` samples, then send the signal; returns the result."""
    deadline = time.monotonic() + WAIT_S
    while len(finished_indices(run_dir)) < before + 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"finished before the signal: {process.communicate()[1][-2000:]}"
    if to_group:  # Ctrl-C in a terminal: every process of the foreground group gets SIGINT
        os.killpg(process.pid, signal.SIGINT)
    else:  # SIGTERM to the launching process (global rank 0) alone
        process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:  # a rank that does not stop: end the whole group, leave nothing behind
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stdout, stderr


#: Makes the launching process (rank 0) exit 6 s late, so that its child exits first: Lightning's launcher kills the
#: whole job (SIGKILL, itself included) within 5 s of a child exiting non-zero, unless the agreed stop stood it down.
LATE_EXIT = """import atexit, sys, time
if not any("train_ddp_process" in arg for arg in sys.argv):
    atexit.register(time.sleep, 6)
"""


def test_ctrl_c_to_the_process_group_stops_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LATE_EXIT)
    code, _, stderr = interrupt_after_new_batches(start(run_dir, PYTHONPATH=str(site)), run_dir, 0, to_group=True)
    assert code == 128 + signal.SIGINT, stderr[-3000:]
    # both ranks get the signal, but not necessarily before the same agreement round: the first round that sees
    # either one's stops both
    assert re.search(r"Stopped by SIGINT \(received by rank (0|1|0, 1)\)", stderr), stderr[-3000:]
    time.sleep(1.0)
    assert not processes_in(run_dir), "every rank exits"
    assert 0 < len(finished_indices(run_dir)) < N


def test_sigterm_then_resume_gives_the_uninterrupted_outputs(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code, _, stderr = interrupt_after_new_batches(start(run_dir), run_dir, 0, to_group=False)
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Stopped by SIGTERM (received by rank 0)" in stderr and f"output_dir={run_dir}" in stderr, stderr[-3000:]
    time.sleep(1.0)
    assert not processes_in(run_dir), "every rank exits"
    second = len(finished_indices(run_dir))
    assert 0 < second < N

    process = start(run_dir)
    stdout, stderr = process.communicate(timeout=WAIT_S)
    assert process.returncode == 0, stderr[-3000:]
    assert f"{N} samples ({second} done before, {N - second} by this run)" in stdout
    assert "Warning" not in stderr and "warn(" not in stderr, stderr[-3000:]
    assert sorted(i for i, _, _ in read_manifests(run_dir)) == list(range(N)), "every sample once"
    assert not list(run_dir.rglob(f"{TMP_MARK}*")), "no partial file"
    resumed = torch.load(run_dir / "predictions.pt", weights_only=True)

    predict(compose_predict(["strategy=none", *JOB[:3]]), tmp_path / "single")
    single = torch.load(tmp_path / "single" / "predictions.pt", weights_only=True)
    assert resumed["index"].tolist() == single["index"].tolist() == list(range(N))
    torch.testing.assert_close(resumed["prediction"], single["prediction"], rtol=1e-5, atol=1e-5)

    with pytest.raises(RunConfigMismatch, match="model.seed: 0 -> 1"):
        predict(compose_predict(["strategy=none", *JOB[:3], "model.seed=1"]), tmp_path / "single")
