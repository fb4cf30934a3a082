"""The replicated-input guard: ranks of a model-parallel group that feed the DiT different inputs get a ValueError.

A ``predict_step`` that seeds the global RNG from the rank (the mistake the guard exists for) raises on every rank
of every model-parallel group (sequence parallel, pipeline, cfg), with a message naming the argument, the ranks
and the fix; ``check_inputs=False`` lets it run; data-parallel ranks, which hold different samples by design, are
never compared. Multi-rank cases run inside one launch per world size (``tests/in_process.py``).
"""

from __future__ import annotations

import pytest
import torch

from lightning_dit_parallel import (
    DiTParallelStrategy,
    FSDPInferenceStrategy,
    PipelineStrategy,
    SequenceParallelStrategy,
)
from lightning_dit_parallel.app.sampling import DiffusionSampler
from lightning_dit_parallel.parallel.guard import _ABSENT, _equal_classes, fingerprints
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.models import build_dit, dit_sampler, requests


class GlobalNoiseSampler(DiffusionSampler):
    """Draws its initial noise from the global RNG, seeded from the rank (``"rank"``: the mistake) or from the
    data-parallel group (``"dp"``: what ``seed_everything`` plus Lightning's sampler amounts to)."""

    def __init__(self, *args, seed_by: str = "rank", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed_by = seed_by

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        layout = self.trainer.strategy.layout
        seed = self.global_rank if self.seed_by == "rank" else layout.coordinates(self.global_rank)["dp"]
        torch.manual_seed(1000 + seed)
        latents = torch.randn(len(batch["index"]), *self.latent_shape)  # (B, C, H, W), rank-dependent
        t = torch.tensor([50])
        model_in = torch.cat([latents, latents]) if self.guided else latents  # (B, ...) -> (2B, ...)
        return self.conditioning(self.transformer, model_in, t, batch, self.guided)


class StepNoiseSampler(GlobalNoiseSampler):
    """Two DiT calls per batch: the first on noise every rank draws alike, the second with noise added from a
    rank-seeded random state (a stochastic scheduler's per-step noise drawn the wrong way). ``seed_by="rank"`` also
    seeds the first call's noise from the rank, from the second batch on."""

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        torch.manual_seed(1000 + (self.global_rank if self.seed_by == "rank" and batch_idx > 0 else 0))
        latents = torch.randn(len(batch["index"]), *self.latent_shape)  # (B, C, H, W)
        t = torch.tensor([50])
        first = self.conditioning(self.transformer, torch.cat([latents, latents]), t, batch, self.guided)
        torch.manual_seed(2000 + self.global_rank)
        stepped = latents + torch.randn_like(latents)  # rank-dependent per-step noise
        return first + self.conditioning(self.transformer, torch.cat([stepped, stepped]), t, batch, self.guided)


def _sampler(seed_by: str = "rank", cls: type[GlobalNoiseSampler] = GlobalNoiseSampler) -> GlobalNoiseSampler:
    base = dit_sampler(build_dit(), steps=1)
    return cls(
        base.transformer,
        base.scheduler,
        base.conditioning,
        base.latent_shape,
        num_inference_steps=1,
        guidance_scale=base.guidance_scale,
        seed_by=seed_by,
    )


#: Model-parallel layouts on 2 ranks: each makes the two ranks one group that must feed identical inputs.
TWO_RANK_LAYOUTS = {
    "ulysses": lambda check: SequenceParallelStrategy(ulysses_degree=2, check_inputs=check),
    "ring": lambda check: SequenceParallelStrategy(ring_degree=2, check_inputs=check),
    "pipeline": lambda check: PipelineStrategy(pp_degree=2, check_inputs=check),
    "cfg": lambda check: DiTParallelStrategy(cfg_degree=2, check_inputs=check),
    "fsdp_ulysses": lambda check: FSDPInferenceStrategy(ulysses_degree=2, check_inputs=check),
}


def _guard_cases(rank: int, world: int, ports: tuple[int, int]) -> dict[str, str]:
    """Every case's outcome on this rank: the ValueError's message, or ``"ran"``."""
    outcomes: dict[str, str] = {}

    def attempt(name: str, module, strategy, samples: int = 2) -> None:
        try:
            predict_here(module, requests(samples, batch_size=2), strategy, world)
            outcomes[name] = "ran"
        except ValueError as err:
            outcomes[name] = str(err)

    with external_launch(rank, world, *ports):
        if world == 2:
            for name, make in TWO_RANK_LAYOUTS.items():
                attempt(f"{name} checked", _sampler("rank"), make(True))
                attempt(f"{name} unchecked", _sampler("rank"), make(False))
            # data parallel only (FSDP over the two dp ranks): different noise per rank is legitimate
            attempt("dp", _sampler("rank"), FSDPInferenceStrategy())
            # the first DiT call of each batch is checked; "every_call" checks the later calls too
            for check in (True, "every_call"):
                attempt(
                    f"step noise, {check}",
                    _sampler("step", StepNoiseSampler),
                    SequenceParallelStrategy(ulysses_degree=2, check_inputs=check),
                )
            attempt(
                "second batch",
                _sampler("rank", StepNoiseSampler),
                SequenceParallelStrategy(ulysses_degree=2),
                samples=4,
            )
        else:
            for seed_by, what in (("rank", "rank"), ("dp", "dp group")):
                strategy = SequenceParallelStrategy(ulysses_degree=2, dp_degree=2)
                attempt(f"dp2 x ulysses2, seeded by {what}", _sampler(seed_by), strategy)
    return outcomes


def _assert_names_the_problem(message: str, ranks: tuple[int, int], where: str) -> None:
    a, b = ranks
    for part in (
        "argument 'hidden_states' differs",
        f"rank {a} holds value 1; rank {b} holds value 2",
        "seed_everything",
        "per-sample generators seeded from the global sample index",
        "check_inputs=False",
    ):
        assert part in message, f"{where}: {part!r} not in {message!r}"


def test_rank_dependent_noise_is_a_clear_error_in_every_model_parallel_group():
    results = run_on_ranks(2, _guard_cases, (free_port(), free_port()), timeout_s=300)
    for rank, outcomes in enumerate(results):
        for name in TWO_RANK_LAYOUTS:
            _assert_names_the_problem(outcomes[f"{name} checked"], (0, 1), f"{name}, rank {rank}")
            assert outcomes[f"{name} unchecked"] == "ran", f"{name} with check_inputs=False, rank {rank}"
        assert outcomes["dp"] == "ran", f"data-parallel ranks were compared, rank {rank}: {outcomes['dp']}"
        assert outcomes["step noise, True"] == "ran", f"a later DiT call was checked by default, rank {rank}"
        _assert_names_the_problem(outcomes["step noise, every_call"], (0, 1), f"every_call, rank {rank}")
        _assert_names_the_problem(outcomes["second batch"], (0, 1), f"the second batch's first call, rank {rank}")


def test_data_parallel_groups_are_checked_apart():
    """dp=2 x ulysses=2: ranks 0,1 and 2,3 are the two groups; each group is compared within itself only."""
    results = run_on_ranks(4, _guard_cases, (free_port(), free_port()), timeout_s=300)
    for rank, outcomes in enumerate(results):
        group = (0, 1) if rank < 2 else (2, 3)
        _assert_names_the_problem(outcomes["dp2 x ulysses2, seeded by rank"], group, f"rank {rank}")
        assert outcomes["dp2 x ulysses2, seeded by dp group"] == "ran", f"rank {rank}"


# -- the fingerprint (no process group) ----------------------------------------------------------------------


def _verdict(*values) -> list[list[int]]:
    return _equal_classes(fingerprints(list(values)))


def test_fingerprint_tells_different_noise_and_order_apart_but_not_rounding():
    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    other = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    assert _verdict(noise, noise.clone()) == [[0, 1]]
    assert _verdict(noise, other) == [[0], [1]]
    assert _verdict(noise, noise.flip(0)) == [[0], [1]], "a batch in another order"
    assert _verdict(noise, noise * (1 + 1e-9)) == [[0, 1]], "float rounding is not a difference"
    assert _verdict(noise, noise[:, :, :16]) == [[0], [1]], "another shape"
    assert _verdict(noise, noise.double()) == [[0], [1]], "another dtype"
    assert _verdict(noise, other, noise) == [[0, 2], [1]]
    broken = noise.clone()
    broken[0, 0, 0, 0] = float("nan")
    assert _verdict(broken, broken.clone()) == [[0, 1]], "the same NaN on every rank is not a difference"
    assert _verdict(broken, noise) == [[0], [1]]


def test_fingerprint_covers_containers_scalars_and_missing_arguments():
    labels = torch.tensor([1, 2])
    assert _verdict({"a": labels, "b": None}, {"b": None, "a": labels.clone()}) == [[0, 1]]
    assert _verdict({"a": labels}, {"a": torch.tensor([2, 1])}) == [[0], [1]]
    assert _verdict((labels, 0.5), (labels, 0.25)) == [[0], [1]], "a Python scalar"
    assert _verdict(None, True) == [[0], [1]]
    assert _verdict(_ABSENT, None) == [[0], [1]], "an argument passed on one rank only"


def test_check_inputs_must_be_a_bool_or_every_call():
    with pytest.raises(ValueError, match="check_inputs must be True, False or 'every_call'"):
        DiTParallelStrategy(ulysses_degree=2, check_inputs="yes")
