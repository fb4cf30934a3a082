"""Fewer predict samples than data-parallel groups: a ValueError naming both counts on every rank, before any
collective (Lightning's predict sampler would fail with a bare AssertionError on the ranks left without one)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_dit_parallel import DiTParallelStrategy, FSDPInferenceStrategy
from lightning_dit_parallel.app.sampling import DiffusionSampler
from lightning_dit_parallel.strategies.samples import check_samples_cover_groups
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.models import SampleRequests, build_dit, dit_sampler, requests


class WithPredictDataloader(DiffusionSampler):
    """The dataloader comes from the module's ``predict_dataloader`` hook rather than from ``trainer.predict``."""

    samples = 1

    def predict_dataloader(self) -> DataLoader:
        return requests(self.samples, batch_size=1)


def _hooked_sampler(samples: int) -> WithPredictDataloader:
    base = dit_sampler(build_dit(), steps=1)
    module = WithPredictDataloader(
        base.transformer,
        base.scheduler,
        base.conditioning,
        base.latent_shape,
        num_inference_steps=1,
    )
    module.samples = samples
    return module


def _plain() -> DiffusionSampler:
    return dit_sampler(build_dit(), steps=1)


def _outcome(run) -> str:
    try:
        out = run()
    except ValueError as err:
        return str(err)
    return f"ran: {tuple(out.shape)}"


def _cases(rank: int, world: int, ports: tuple[int, int]) -> dict[str, str]:
    with external_launch(rank, world, *ports):
        return {
            "dp only": _outcome(
                lambda: predict_here(_plain(), requests(1, 1), DiTParallelStrategy(dp_degree=2), world)
            ),
            "fsdp": _outcome(lambda: predict_here(_plain(), requests(1, 1), FSDPInferenceStrategy(), world)),
            "hook": _outcome(lambda: _run_hooked(_hooked_sampler(1), world)),
            "enough after": _outcome(lambda: _run_hooked(_hooked_sampler(2), world)),
        }


def _run_hooked(module, world: int) -> torch.Tensor:
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=FSDPInferenceStrategy(),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return torch.cat(trainer.predict(module))


def test_fewer_samples_than_data_parallel_groups_is_a_clear_error_on_every_rank():
    for rank, outcomes in enumerate(run_on_ranks(2, _cases, (free_port(), free_port()), timeout_s=300)):
        for case in ("dp only", "fsdp", "hook"):
            assert "has 1 sample for 2 data-parallel groups" in outcomes[case], (rank, case, outcomes[case])
            assert "Predict at least 2 samples" in outcomes[case], (rank, case, outcomes[case])
        assert outcomes["enough after"] == "ran: (1, 4, 8, 8)", (rank, outcomes["enough after"])


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(1)


def test_only_dataloaders_that_lightning_shards_are_checked():
    check_samples_cover_groups([requests(2, 1), requests(3, 2)], 2, "dp=2")
    check_samples_cover_groups(requests(0, 1), 2, "dp=2")  # no sample at all: no batch anywhere
    check_samples_cover_groups(DataLoader(_Stream()), 2, "dp=2")  # no length
    sharded = DataLoader(SampleRequests(1), sampler=DistributedSampler(SampleRequests(1), num_replicas=2, rank=0))
    check_samples_cover_groups(sharded, 2, "dp=2")  # the user's own distributed sampler
    with pytest.raises(ValueError, match=r"Predict dataloader 1 has 1 sample for 4 data-parallel groups"):
        check_samples_cover_groups({"a": requests(4, 1), "b": requests(1, 1)}, 4, "dp=4")
