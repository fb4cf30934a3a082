"""Tensor parallelism through ``Trainer.predict`` for every family of the model zoo (``tests/zoo/``).

Every case is either exact (every rank's output equals the one-process output, float32, relative 1e-5) under
``tp_degree=2`` and ``tp_degree=2 x ulysses_degree=2``, or refused at setup, on every rank, with a message that names
the model's reason (``REFUSED``: a new refusal, or a refusal that no longer happens, fails). One ``Trainer.predict``
launch per layout runs the exact cases (on 4 ranks the last case of each family, and every LTX and HunyuanVideo
case); one launch of 4 ranks checks every refusal under both layouts.
``pytest tests/test_tp_zoo.py --zoo ltx,hunyuan_video`` runs only the named families.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_dit_parallel import HeadFeatures, Packed, ParallelLayout, TensorParallelStrategy, parallelize, plan_for
from lightning_dit_parallel.parallel.tensor import resolve_layout
from lightning_dit_parallel.parallel.tensor.features import cut_heads
from tests.distributed import run_on_ranks
from tests.rank_outputs import max_relative_error
from tests.test_zoo import selected_cases
from tests.zoo import ZooCase, all_cases, family, seeded_model
from tests.zoo import easyanimate as easyanimate_zoo
from tests.zoo_module import predict_zoo, predict_zoo_single

#: case name, or ``<family>-`` for every case of a family -> what the refusal must say.
REFUSED = {
    # Cosmos 2.5's image-context attention sizes its heads as out_dim // heads (the model width)
    "cosmos-27vid-7txt-perframe-imgctx": "image-context attention of CosmosAttention",
    # the blocks after mmdit_layers add the unprojected text part of the attention output to the text stream (an
    # EasyAnimate whose blocks are all MMDiT blocks is split: EXTRA_CASES)
    "easyanimate-16vid-8txt": "blocks after mmdit_layers return the text part of the attention output",
    "easyanimate-27vid-7txt": "blocks after mmdit_layers return the text part of the attention output",
    # the zoo's tiny Mochi has an MLP of 85 features per gate half (4 * 64 * 2/3, rounded): it does not split
    "mochi-": "splits its features of each part [85, 85] over tp_degree=2, which does not divide",
}

#: (devices, degrees, every case or the last case of each family). On 4 ranks the last case of each family (its
#: variant: other token counts, masks, per-token timesteps) keeps the launch short; LTX's and HunyuanVideo's cases all.
LAYOUTS = {
    "tp2": (2, dict(tp_degree=2), "all"),
    "tp2_ulysses2": (4, dict(tp_degree=2, ulysses_degree=2), "last"),
}
ALL_CASES_ON_4_RANKS = ("ltx", "hunyuan_video")


def layout_cases(cases: list[ZooCase], which: str) -> list[ZooCase]:
    if which == "all":
        return cases
    last = {family(c): c for c in cases}  # the last case of each family
    return [c for c in cases if family(c) in ALL_CASES_ON_4_RANKS or last[family(c)] is c]


def _easyanimate_all_mmdit():
    from diffusers import EasyAnimateTransformer3DModel

    z = easyanimate_zoo
    return seeded_model(
        lambda: EasyAnimateTransformer3DModel(
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=z.CHANNELS,
            out_channels=z.CHANNELS,
            patch_size=z.PATCH,
            num_layers=2,
            mmdit_layers=2,
            time_embed_dim=32,
            text_embed_dim=z.TEXT_DIM,
            text_embed_dim_t5=z.T5_DIM,
        )
    )


#: cases of this test only: variants of zoo families whose zoo cases are refused
EXTRA_CASES = [
    ZooCase("easyanimate-allmmdit-27vid-7txt", _easyanimate_all_mmdit, easyanimate_zoo.inputs(3, 3, 3, 7, 0)),
]


def refusal(case: ZooCase) -> str | None:
    return next(
        (why for key, why in REFUSED.items() if case.name == key or case.name.startswith(key) and key.endswith("-")),
        None,
    )


@pytest.fixture(scope="module")
def cases(request) -> list[ZooCase]:
    chosen = selected_cases(request.config)
    families = {family(c) for c in chosen}
    return chosen + [c for c in EXTRA_CASES if family(c) in families]


@pytest.fixture(scope="module")
def exact_cases(cases) -> list[ZooCase]:
    return [c for c in cases if refusal(c) is None]


@pytest.fixture(scope="module")
def references(exact_cases) -> dict[str, torch.Tensor]:
    return predict_zoo_single(exact_cases)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp_zoo_equals_one_process(layout: str, exact_cases, references, tmp_path: Path, record_property):
    devices, degrees, which = LAYOUTS[layout]
    chosen = layout_cases(exact_cases, which)
    outputs = predict_zoo(chosen, TensorParallelStrategy(**degrees, start_method="fork"), devices, tmp_path)
    errors: dict[str, float] = {}
    problems = []
    for case in chosen:
        reference = references[case.name]
        worst = 0.0
        for rank, out in enumerate(outputs):
            if out[case.name].shape != reference.shape:
                problems.append(f"{case.name} rank {rank}: shape {tuple(out[case.name].shape)}")
                continue
            worst = max(worst, max_relative_error(out[case.name], reference))
        errors[case.name] = worst
        if not worst <= 1e-5:
            problems.append(f"{case.name}: max relative error {worst:.2e}")
    record_property("max_relative_error", errors)
    assert not problems, f"{layout}: " + "; ".join(problems)


def _refusals(rank: int, world: int, names: list[str]) -> dict[str, str]:
    """``parallelize`` (what the strategy's setup calls) of each refused case under both layouts: its error."""
    found = {}
    by_name = {c.name: c for c in (*all_cases(), *EXTRA_CASES)}
    for layout_name, degrees in [("tp2", dict(dp=2, tp=2)), ("tp2_ulysses2", dict(tp=2, ulysses=2))]:
        layout = ParallelLayout(**degrees).resolve(world)
        mesh = layout.build_mesh("cpu")
        for name in names:
            model = by_name[name].build()
            try:
                handle = parallelize(model, layout, mesh)
            except ValueError as err:
                found[f"{name} {layout_name}"] = str(err)
            else:
                handle.remove()
                found[f"{name} {layout_name}"] = "no error"
    return found


def test_tp_zoo_refusals_name_the_reason(cases, request):
    if not request.config.getoption("--zoo"):
        stale = [k for k in REFUSED if not any(c.name == k or c.name.startswith(k) and k.endswith("-") for c in cases)]
        assert not stale, f"REFUSED names no zoo case: {stale}"
    refused = [c.name for c in cases if refusal(c) is not None]
    if not refused:
        pytest.skip("no refused family selected")
    results = run_on_ranks(4, _refusals, refused)
    for key, message in results[0].items():
        why = refusal(next(c for c in cases if c.name == key.split()[0]))
        assert why in message, f"{key}: {message}"
        assert all(r[key] == message for r in results), f"{key}: the ranks raised different errors"


# -- layouts, resolved without any process group ----------------------------------------------------------------------


def _build(name: str):
    return next(c for c in all_cases() if c.name == name).build()


def test_single_stream_blocks_project_attention_and_mlp_together():
    """HunyuanVideo's (and Chroma's, HunyuanImage's) single-stream blocks: the attention has no to_out; proj_mlp is
    split column-wise and proj_out, over cat([attention, MLP]), packed row-wise with the two widths."""
    for name in ("hunyuan_video-16vid-8txt", "chroma-16img-8txt", "hunyuan_image-16img-8txt"):
        model = _build(name)
        styles = resolve_layout(model, plan_for(model)).styles
        block = model.single_transformer_blocks[0]
        inner, mlp = block.attn.to_q.out_features, block.proj_mlp.out_features
        assert styles["single_transformer_blocks.0.proj_out"] == Packed("rowwise", (inner, mlp)), name
        assert styles["single_transformer_blocks.0.proj_mlp"] == "colwise", name
        assert styles["single_transformer_blocks.0.attn.to_q"] == "colwise", name
        assert "single_transformer_blocks.0.attn" in resolve_layout(model, plan_for(model)).attention


def test_rotary_over_all_heads_is_cut_like_the_heads():
    """LTX's rotary tables (B, S, heads * head_dim) are cut to the rank's heads: rank r keeps features
    [r * F/N, (r+1) * F/N), the features of its heads after the column-wise to_q; LTX-2's "split" tables
    (B, heads, S, D/2) are cut along the heads."""
    model = _build("ltx-16vid-8txt")
    layout = resolve_layout(model, plan_for(model))
    assert layout.outputs == {"rope": (HeadFeatures(-1), HeadFeatures(-1))}
    table = torch.arange(2 * 3 * 8.0).reshape(2, 3, 8)
    cos, sin = cut_heads((table, -table), layout.outputs["rope"], 1, 2, "rope")
    assert torch.equal(cos, table[..., 4:]) and torch.equal(sin, -table[..., 4:])
    split = plan_for(_build("ltx2-16vid-12aud-8txt")).tensor_parallel_outputs["rope"][0]
    table = torch.arange(2 * 4 * 3 * 2.0).reshape(2, 4, 3, 2)  # (B, heads, S, D/2)
    assert torch.equal(cut_heads(table, split, 0, 2, "rope"), table[:, :2])
    with pytest.raises(ValueError, match="cannot be cut into tp_degree=4 equal parts"):
        cut_heads(torch.zeros(2, 3, 6), HeadFeatures(-1), 0, 4, "rope")
