"""``Trainer.predict`` inside ranks started by ``run_on_ranks``: several predicts in one process, as under torchrun.

Lightning treats a process whose environment names its rank (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...)
as started by an external launcher and runs the strategy in place, so one launch of N ranks can run many
``trainer.predict`` calls in a row, each strategy creating and destroying its own process group, as a script
launched with torchrun (or Lightning's own script launcher) does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import lightning as L
import torch
import torch.distributed as dist

from lightning_dit_parallel.utils.multiprocess import free_port


@contextmanager
def external_launch(rank: int, world: int, port: int, harness_port: int | None) -> Iterator[None]:
    """Inside, this rank looks like a torchrun process to Lightning and has no process group of its own.

    ``run_on_ranks`` gave the rank a process group; it is destroyed on entry (every strategy then makes its own on
    ``port``) and made again on exit over ``harness_port``, for ``run_on_ranks`` to close. Both ports must be the
    same on every rank. ``harness_port=None``: on exit the rank gets a group of its own alone (for tests in which a
    peer dies and could never join a group of all ranks again).
    """
    dist.destroy_process_group()
    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(
        LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if dist.is_initialized():  # a strategy that failed to tear down: leave the harness a group it can close
            dist.destroy_process_group()
        if harness_port is None:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        else:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{harness_port}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=60),
            )


def predict_here(module: L.LightningModule, loader, strategy, devices: int) -> torch.Tensor:
    """``trainer.predict`` in this process (see ``external_launch``); this rank's outputs, concatenated."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    outputs = trainer.predict(module, loader)
    return torch.cat(outputs) if outputs else torch.empty(0)
