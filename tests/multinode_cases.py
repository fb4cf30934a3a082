"""Multi-node ``Trainer.predict`` cases, run by ``tests/test_multinode.py`` under a launcher in every process.

    python -m tests.multinode_cases OUT --cases ulysses,ring --num-nodes 2 --devices 2

Every process runs each case with ``Trainer(num_nodes=..., devices=...)`` and keeps what its rank saw under
``OUT/<case>/``: ``rank<global rank>.pt`` (its predictions, see ``rank_outputs.SaveRankOutputs``),
``rank<global rank>.json`` (cluster environment, ranks, layout with the axes that cross nodes, cross-node
warnings, the error, whether the process group was torn down) and, on global rank 0 of the data-parallel cases,
``writer.pt`` (what ``OrderedPredictionWriter`` gathered). The test compares them with the one-process output.

``--die-node N --die-file F``: on node N every process writes the time to F and exits at the start of the second
batch, while the other node's ranks wait for it in a collective.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from lightning_dit_parallel import DiTParallelStrategy, FSDPInferenceStrategy, SequenceParallelStrategy
from lightning_dit_parallel.app.writer import OrderedPredictionWriter
from lightning_dit_parallel.parallel.nodes import CrossNodeWarning
from tests.models import build_dit, build_pixart, dit_sampler, pixart_sampler, requests
from tests.rank_outputs import SaveRankOutputs

#: Latent side 6 with patch 2: 9 image tokens, which divide by neither 2 nor 4 (padded shards).
SIZE = 6
STEPS = 2

FAMILIES: dict[str, Callable[[], L.LightningModule]] = {
    "dit": lambda: dit_sampler(build_dit(sample_size=SIZE), steps=STEPS),
    "pixart": lambda: pixart_sampler(build_pixart(sample_size=SIZE), steps=STEPS),
}


@dataclass(frozen=True)
class Case:
    """One ``Trainer.predict`` on 2 nodes x 2 ranks (the degrees multiply to 4) or on 2 nodes x 1 rank."""

    family: str
    strategy: Callable[..., Any]
    samples: int = 3
    batch_size: int = 2
    writer: bool = False  # data parallel: rank 0's OrderedPredictionWriter holds every sample
    error: str | None = None  # a ValueError every rank must raise


#: 2 nodes x 2 ranks. Ranks are numbered node by node, so an axis whose groups span more than 2 consecutive ranks
#: crosses nodes: ulysses=4 / ring=4 do; in USP 2 x 2 only ring does; with pp 2 x ulysses 2 the two stages sit on
#: different nodes; with dp 2 x ulysses 2 the data-parallel groups (and the FSDP shard group) span both nodes.
CASES: dict[str, Case] = {
    "ulysses": Case("pixart", lambda **kw: SequenceParallelStrategy(ulysses_degree=4, **kw)),
    "ring": Case("pixart", lambda **kw: SequenceParallelStrategy(ring_degree=4, **kw)),
    "usp": Case("dit", lambda **kw: SequenceParallelStrategy(ulysses_degree=2, ring_degree=2, **kw)),
    "pipeline": Case("dit", lambda **kw: DiTParallelStrategy(pp_degree=2, ulysses_degree=2, **kw)),
    "fsdp": Case(
        "dit", lambda **kw: FSDPInferenceStrategy(ulysses_degree=2, **kw), samples=4, batch_size=1, writer=True
    ),
    "data_parallel": Case(
        "pixart", lambda **kw: DiTParallelStrategy(dp_degree=2, ulysses_degree=2, **kw), samples=5, writer=True
    ),
    "refused": Case(
        "dit",
        lambda **kw: SequenceParallelStrategy(ulysses_degree=4, cross_node="error", **kw),
        error="Refusing the layout (cross_node='error')",
    ),
    # 2 nodes x 1 rank
    "ulysses_2x1": Case("dit", lambda **kw: SequenceParallelStrategy(ulysses_degree=2, **kw), samples=4),
}


class _DieOnNode(L.Callback):
    """Every process of ``node`` records the time in ``path`` and exits at the start of the second batch."""

    def __init__(self, node: int, path: Path) -> None:
        self.node, self.path = node, path

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.node_rank == self.node and batch_idx == 1:
            self.path.write_text(str(time.time()))
            os._exit(3)


def run_case(
    name: str, out: Path, num_nodes: int, devices: int, die: _DieOnNode | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run one case in this process; returns (and writes) this rank's record."""
    case = CASES[name]
    strategy = case.strategy(**({} if timeout is None else {"timeout": timeout}))
    writer = OrderedPredictionWriter(save_images=False, save_tensors=False) if case.writer else None
    callbacks = [SaveRankOutputs(out / name), *([writer] if writer else []), *([die] if die else [])]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    error, start = None, time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CrossNodeWarning)
        try:
            trainer.predict(FAMILIES[case.family](), requests(case.samples, case.batch_size), return_predictions=False)
        except ValueError as err:
            if case.error is None or case.error not in str(err):
                raise
            error = str(err)
    layout = strategy._layout
    record = {
        "environment": type(trainer.strategy.cluster_environment).__name__,
        "global_rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "local_rank": trainer.local_rank,
        "world_size": trainer.world_size,
        "layout": None if layout is None else layout.describe(devices),
        "across": None if layout is None else list(layout.axes_across_nodes(devices)),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, CrossNodeWarning)],
        "error": error,
        "torn_down": not dist.is_initialized(),
        "seconds": time.monotonic() - start,
    }
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    if writer is not None and trainer.global_rank == 0:
        torch.save({"index": writer.indices, "prediction": writer.predictions}, out / name / "writer.pt")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", required=True, help="comma-separated names of CASES")
    parser.add_argument("--num-nodes", type=int, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=None, help="the strategies' collective timeout in seconds")
    parser.add_argument("--die-node", type=int, default=None)
    parser.add_argument("--die-file", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    die = _DieOnNode(args.die_node, args.die_file) if args.die_node is not None else None
    for name in args.cases.split(","):
        run_case(name, args.out, args.num_nodes, args.devices, die, args.timeout)


if __name__ == "__main__":
    main()
