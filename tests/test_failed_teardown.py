"""Teardown after a failed predict, for the strategies whose undo gathers weights (FSDP, tensor and pipeline
parallelism; ``strategies/failure.py``).

- Every rank raises at the same point (a bug in ``predict_step``, the replicated-input guard's error): all ranks
  reach teardown, so the weights are gathered back. The module is the plain model again, its plain forward equals
  the one before, and the next predict on the same module is exact.
- One rank raises while its peer is inside a collective of the step: no collective is run after the failure. Both
  ranks raise, the module is marked incomplete (meta weights), and the next predict on it, or a plain forward,
  raises a ``ValueError`` on every rank that says to load the model again.

One launch of two ranks runs every case in a row on the same processes, as under torchrun.
"""

from __future__ import annotations

import torch

from lightning_dit_parallel import DiTParallelStrategy, FSDPInferenceStrategy, PipelineStrategy
from lightning_dit_parallel.parallel.incomplete import check_complete
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.models import build_dit, dit_sampler, requests
from tests.test_input_guard import _sampler as rank_seeded_sampler
from tests.test_repeated_predicts import _plain_state

STEPS = 2
WORLD = 2

#: strategies whose removal runs collectives
GATHERING = {
    "fsdp_ulysses": lambda: FSDPInferenceStrategy(ulysses_degree=2, timeout=10),
    "pipeline": lambda: PipelineStrategy(pp_degree=2, timeout=10),
    "tp": lambda: DiTParallelStrategy(tp_degree=2, timeout=10),
}


def _failing_on(module, ranks: set[int], rank: int) -> None:
    """``module.predict_step`` raises at the start of the second batch on ``ranks``."""
    plain_step = type(module).predict_step.__get__(module)

    def predict_step(batch, batch_idx):
        if batch_idx == 1 and rank in ranks:
            raise RuntimeError("injected failure in predict_step")
        return plain_step(batch, batch_idx)

    module.predict_step = predict_step


def _outcome(call) -> str:
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the outcome is the error
        return f"{type(err).__name__}: {err}"
    return "returned"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _cases(rank: int, world: int, ports: tuple[int, int]) -> list[str]:
    failures = []
    module = dit_sampler(build_dit(), steps=STEPS)
    batch = next(iter(requests(4)))
    reference = module.sample(batch)
    expected = torch.cat([module.sample(b) for b in requests(4)])
    with external_launch(rank, world, *ports):
        # every rank raises in the same place: the weights come back, the module stays usable
        for name, make in GATHERING.items():
            _failing_on(module, {0, 1}, rank)
            outcome = _outcome(lambda: predict_here(module, requests(4), make(), world))
            del module.predict_step
            if not outcome.startswith("RuntimeError: injected"):
                failures.append(f"{name}, all ranks raise, rank {rank}: {outcome}")
            failures += [f"{name} after all ranks raised, rank {rank}: {p}" for p in _plain_state(module)]
            if not torch.equal(module.sample(batch), reference):
                failures.append(f"{name}: plain forward after all ranks raised differs, rank {rank}")
            out = predict_here(module, requests(4), make(), world)
            if out.shape != expected.shape or not _relative(out, expected) <= 1e-5:
                failures.append(f"{name}: predict after all ranks raised is not exact, rank {rank}")

        # the guard's ValueError is raised on every rank after its all-gather: FSDP's shards are gathered back
        guarded = rank_seeded_sampler("rank")
        guarded_reference = guarded.sample(batch)
        outcome = _outcome(lambda: predict_here(guarded, requests(2), GATHERING["fsdp_ulysses"](), world))
        if not outcome.startswith("ValueError: The ranks of a model-parallel group"):
            failures.append(f"guard under FSDP, rank {rank}: {outcome}")
        failures += [f"guard under FSDP, rank {rank}: {p}" for p in _plain_state(guarded)]
        if not torch.equal(guarded.sample(batch), guarded_reference):
            failures.append(f"guard under FSDP: plain forward afterwards differs, rank {rank}")

        # only rank 1 raises, while rank 0 waits in a collective of the step: nothing is gathered, reload needed
        for name, make in GATHERING.items():
            module = dit_sampler(build_dit(), steps=STEPS)
            _failing_on(module, {1}, rank)
            outcome = _outcome(lambda: predict_here(module, requests(4), make(), world))
            if outcome == "returned" or (rank == 1 and not outcome.startswith("RuntimeError: injected")):
                failures.append(f"{name}, rank 1 raises, rank {rank}: {outcome}")
            incomplete = _outcome(lambda: check_complete(module))
            if "load the model again" not in incomplete:
                failures.append(f"{name}, rank 1 raised: module not marked incomplete on rank {rank}: {incomplete}")
            again = _outcome(lambda: predict_here(module, requests(4), make(), world))
            if not again.startswith("ValueError") or "load the model again" not in again:
                failures.append(f"{name}: predict on the incomplete module, rank {rank}: {again}")
            plain = _outcome(lambda: module.sample(batch))
            if not plain.startswith("ValueError") or "load the model again" not in plain:
                failures.append(f"{name}: a plain forward of the incomplete module, rank {rank}: {plain}")
            if torch.distributed.is_initialized():
                failures.append(f"{name}: process group left behind, rank {rank}")
    return failures


def test_teardown_after_a_failure_gathers_only_when_every_rank_is_there():
    results = run_on_ranks(WORLD, _cases, (free_port(), free_port()), timeout_s=300)
    failures = [f for rank_failures in results for f in rank_failures]
    assert not failures, "\n".join(failures)
