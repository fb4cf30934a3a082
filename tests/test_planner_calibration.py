"""The planner against measurements: for the layouts the test suite runs, the predicted parameter bytes per rank
equal the measured ones within 5% and the predicted bytes sent per DiT call equal ``CommCounter``'s (plus DTensor's
functional collectives) within 10%, by kind; ``strategy=auto`` runs the layout it chooses exactly.

One launch per world size runs every case (tiny seeded models, token counts that do not divide the degrees)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy
from lightning_dit_parallel.planner.layouts import PlannedLayout
from lightning_dit_parallel.planner.spec import model_spec
from lightning_dit_parallel.planner.work import Work
from lightning_dit_parallel.registry import plan_for
from lightning_dit_parallel.testing.measure import measure_call, predict_call, relative_error
from tests.distributed import run_on_ranks
from tests.models import POOLED_DIM, TEXT_DIM, build_dit, build_flux, build_wan, dit_sampler, requests
from tests.rank_outputs import assert_exact, load_rank_outputs, predict_single


def _dit():
    model = build_dit(sample_size=10, layers=3)  # 25 image tokens, 3 blocks
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(4, 4, 10, 10, generator=g),
        timestep=torch.full((4,), 5),
        class_labels=torch.tensor([1, 2, 10, 10]),
        return_dict=False,
    )
    return model, inputs, Work(tokens=25, batch=2, text_tokens=0)


def _flux():
    model = build_flux()
    g = torch.Generator().manual_seed(0)
    s, t = 30, 7
    inputs = dict(
        hidden_states=torch.randn(2, s, 16, generator=g),
        encoder_hidden_states=torch.randn(2, t, TEXT_DIM, generator=g),
        pooled_projections=torch.randn(2, POOLED_DIM, generator=g),
        timestep=torch.full((2,), 0.5),
        img_ids=torch.zeros(s, 3),
        txt_ids=torch.zeros(t, 3),
        return_dict=False,
    )
    return model, inputs, Work(tokens=s, batch=1, text_tokens=t)


def _wan():
    model = build_wan()
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 6, 10, generator=g),
        timestep=torch.full((2,), 5),
        encoder_hidden_states=torch.randn(2, 7, TEXT_DIM, generator=g),
        return_dict=False,
    )
    return model, inputs, Work(tokens=3 * 3 * 5, batch=1, text_tokens=7)


CASES = {"dit": _dit, "flux": _flux, "wan": _wan}
TWO_RANKS = [
    dict(ulysses=2),
    dict(ring=2),
    dict(cfg=2),
    dict(dp=2, fsdp=True),
    dict(ulysses=2, fsdp=True),
    dict(pp=2, pp_mode="microbatch"),
    dict(tp=2),
]
FOUR_RANKS = [
    dict(ring=2, ulysses=2),
    dict(ulysses=4),
    dict(cfg=2, ulysses=2, fsdp=True),
    dict(cfg=2, pp=2, pp_mode="microbatch"),
    dict(pp=2, ulysses=2, fsdp=True, pp_mode="microbatch"),
    dict(dp=2, ring=2),
    dict(dp=2, cfg=2, fsdp=True),
    dict(tp=2, ulysses=2),
]
EXTRA = {
    2: [("dit", dict(pp=2, pp_mode="pipefusion", patches=5))],
    4: [
        ("dit", dict(dp=2, pp=2, fsdp=True, pp_mode="microbatch")),
        ("dit", dict(dp=2, pp=2, pp_mode="microbatch")),
        ("dit", dict(cfg=2, pp=2, pp_mode="pipefusion", patches=5)),
        ("dit", dict(pp=2, ulysses=2, pp_mode="pipefusion", patches=5)),
        ("dit", dict(pp=2, ring=2, pp_mode="pipefusion", patches=5)),
        ("flux", dict(pp=2, ulysses=2, pp_mode="pipefusion", patches=2)),
    ],
}


def _cases(world: int) -> list[tuple[str, dict]]:
    layouts = TWO_RANKS if world == 2 else FOUR_RANKS
    return [(case, kw) for case in CASES for kw in layouts] + EXTRA[world]


def _measure_all(rank: int, world: int, cases: list[tuple[str, dict]]) -> list[dict]:
    out = []
    for case, kwargs in cases:
        model, inputs, work = CASES[case]()
        layout = PlannedLayout(**kwargs)
        predicted = predict_call(model_spec(model, plan_for(model)), work, layout, element=4)
        measured = measure_call(model, inputs, layout)
        out.append(
            {
                "params": (predicted.parameter_bytes, measured["parameter_bytes"]),
                "predicted": dict(predicted.bytes_sent),
                "measured": measured["bytes_sent"],
            }
        )
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_predicted_parameters_and_bytes_match_the_measured_ones(world):
    cases = _cases(world)
    results = run_on_ranks(world, _measure_all, cases, timeout_s=600)
    for i, (case, kwargs) in enumerate(cases):
        name = f"{case} {PlannedLayout(**kwargs).describe()}"
        predicted_params = results[0][i]["params"][0]
        measured_params = max(r[i]["params"][1] for r in results)  # the busiest rank, as the planner predicts
        assert relative_error(predicted_params, measured_params) <= 0.05, (
            f"{name}: parameter bytes {predicted_params} predicted, {measured_params} measured"
        )
        predicted = results[0][i]["predicted"]
        kinds = set(predicted) | {k for r in results for k in r[i]["measured"]}
        for kind in kinds:
            measured = max(r[i]["measured"].get(kind, 0) for r in results)
            assert relative_error(predicted.get(kind, 0), measured) <= 0.10, (
                f"{name}: {kind} bytes {predicted.get(kind, 0)} predicted, {measured} measured"
            )


def test_strategy_auto_chooses_a_layout_and_equals_one_process(tmp_path):
    import lightning as L

    from tests.rank_outputs import SaveRankOutputs

    class SaveLayout(L.Callback):  # strategy=auto chooses inside the forked ranks: each writes what it resolved
        def on_predict_start(self, trainer, pl_module) -> None:
            Path(tmp_path / f"layout{trainer.global_rank}.txt").write_text(trainer.strategy.layout.describe())

    reference = predict_single(dit_sampler(build_dit(sample_size=10)), requests(2))
    strategy = DiTParallelStrategy(auto=True, memory="8GiB", start_method="fork")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveRankOutputs(tmp_path), SaveLayout()],
    )
    trainer.predict(dit_sampler(build_dit(sample_size=10)), requests(2), return_predictions=False)
    assert_exact(load_rank_outputs(tmp_path, 2), reference, "strategy=auto")
    chosen = {(tmp_path / f"layout{r}.txt").read_text() for r in range(2)}
    assert len(chosen) == 1, f"the ranks chose different layouts: {chosen}"
    assert "dp=1" in chosen.pop(), "one batch per step: the two ranks work on it together"
