"""The layout planner without processes: model sizes and tokens from public configs, the layouts it lists, the
recommendation, ``ldp-plan``'s JSON, and what ``strategy=auto`` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_dit_parallel import DiTParallelStrategy, plan_layouts
from lightning_dit_parallel.planner.cli import main as ldp_plan
from lightning_dit_parallel.planner.layouts import Axes
from lightning_dit_parallel.planner.models import load_models
from lightning_dit_parallel.planner.tokens import latent_grid
from lightning_dit_parallel.planner.work import Work, parse_bytes, parse_rate
from lightning_dit_parallel.strategies.auto import AutoHints, choose_layout
from tests.models import build_dit, dit_sampler

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
WAN = CONFIGS / "wan2.1-t2v-14b"
FLUX = CONFIGS / "flux.1-dev"


@pytest.fixture(scope="module")
def wan():
    return load_models(WAN)


@pytest.fixture(scope="module")
def flux():
    return load_models(FLUX)


def test_public_configs_give_the_known_sizes_and_tokens(wan, flux):
    """Counted on the meta device from the configs: Wan 2.1 14B, UMT5-XXL, FLUX.1-dev, T5-XXL + CLIP-L."""
    assert wan.dit.numel == 14_288_491_584 and wan.dit.num_blocks == 40 and wan.dit.head_counts() == (40,)
    assert [round(e.numel / 1e9, 2) for e in wan.text_encoders] == [5.68]
    assert (wan.vae.spatial, wan.vae.temporal, wan.vae.latent_channels) == (8, 4, 16)
    grid = latent_grid(wan.dit.name, wan.dit.config, wan.vae, Work(height=720, width=1280, frames=81))
    assert (grid.frames, grid.height, grid.width, grid.tokens) == (21, 90, 160, 21 * 45 * 80)
    assert round(flux.dit.numel / 1e9, 2) == 11.90 and flux.dit.num_blocks == 19 + 38
    assert sorted(round(e.numel / 1e9, 2) for e in flux.text_encoders) == [0.12, 4.76]
    # Flux packs 2x2 latent pixels into one 64-channel token (in_channels = 4 x the VAE's 16)
    assert latent_grid(flux.dit.name, flux.dit.config, flux.vae, Work(height=1024, width=1024)).tokens == 4096
    # the joint attention runs over text and image; Wan's self-attention over the video only
    assert {a.sequences for a in flux.dit.self_attention} == {("text", "image")}
    assert {a.sequences for a in wan.dit.self_attention} == {("video",)}


def test_every_layout_is_valid_for_the_model_and_the_world(wan):
    plan = plan_layouts(wan, devices=8, memory="24GiB", height=720, width=1280, frames=81, cfg_calls="separate")
    seen = set()
    for e in plan.layouts:
        lay = e.layout
        assert lay.world_size == 8, lay
        assert 40 % (lay.ulysses * lay.tp) == 0, lay
        assert lay.cfg in (1, 2), lay  # a CFG pair takes one of the two separate calls each
        assert not (lay.cfg == 2 and lay.fsdp), "CFG over separate calls refuses FSDP over the cfg axis"
        assert lay.dp == 1, "one sample: no second data-parallel group"
        assert not (lay.fsdp and lay.shard_degree == 1)
        seen.add(lay)
    assert len(seen) == len(plan.layouts)
    names = {e.layout.describe() for e in plan.layouts}
    assert {"ulysses8 +fsdp", "ring8", "ring2 x ulysses4 +fsdp +pvae", "pp8(microbatch)"} <= names
    # CFG parallel over the two separate calls: each rank of the pair makes one call of the whole batch per step, so
    # against the same Ulysses group without the pair the step's compute halves
    by_name = {e.layout.describe(): e for e in plan.layouts}
    work = dict(memory="24GiB", height=720, width=1280, frames=81)
    four = plan_layouts(wan, devices=4, cfg_calls="separate", **work)
    alone, paired = {e.layout.describe(): e for e in four.layouts}["ulysses4 +fsdp"], by_name["cfg2 x ulysses4"]
    assert paired.time.compute_s == pytest.approx(alone.time.compute_s / 2, rel=0.05)
    # the same work per rank as splitting a doubled batch
    doubled = plan_layouts(wan, devices=8, cfg_calls="doubled", **work)
    assert paired.time.compute_s == pytest.approx(
        {e.layout.describe(): e for e in doubled.layouts}["cfg2 x ulysses4"].time.compute_s, rel=0.05
    )


def test_recommendation_fits_is_exact_and_fastest(wan):
    plan = plan_layouts(wan, devices=8, memory="24GiB", height=720, width=1280, frames=81, cfg_calls="separate")
    chosen = [e for e in plan.layouts if e.recommended]
    assert len(chosen) == 1 and chosen[0].fits and chosen[0].exact
    fitting = [e for e in plan.layouts if e.fits and e.exact]
    assert chosen[0].time.total_s == min(e.time.total_s for e in fitting)
    assert "fits" in chosen[0].reason
    # the same DiT without FSDP cannot hold 26.6 GiB of weights on a 24 GiB device
    whole = [e for e in plan.layouts if e.layout.describe() == "ulysses8"]
    assert whole and not whole[0].fits
    sharded = next(e for e in plan.layouts if e.layout.describe() == "ulysses8 +fsdp")
    assert sharded.memory.dit_parameters == pytest.approx(wan.dit.numel * 2 / 8, rel=0.01)
    assert sharded.bytes_per_step["all_to_all"] > 0 and sharded.bytes_per_step["all_gather"] > 0


def test_nothing_fits_means_no_recommendation(flux):
    plan = plan_layouts(flux, devices=2, memory="4GiB", height=1024, width=1024, cfg=False)
    assert not any(e.recommended for e in plan.layouts) and not any(e.fits for e in plan.layouts)


def test_approximate_layouts_only_when_allowed(flux):
    base = dict(devices=4, memory="80GiB", height=1024, width=1024, cfg=False)
    exact = plan_layouts(flux, **base)
    assert exact.recommended.exact
    approx = [e for e in exact.layouts if not e.exact]
    assert approx, "DistriFusion (and PipeFusion where the plan allows it) are listed"
    for e in approx:
        assert not e.recommended
        assert e.layout.pp_mode == "pipefusion" or e.layout.distrifusion > 1
        assert e.memory.caches > 0  # stale keys and values of the whole sequence
    assert plan_layouts(flux, **base, allow_approximate=True).recommended is not None


def test_ldp_plan_json_lists_every_layout_with_the_required_fields(capsys):
    code = ldp_plan(
        [
            str(FLUX),
            "--devices",
            "4",
            "--memory",
            "24GiB",
            "--dtype",
            "bfloat16",
            "--height",
            "1024",
            "--width",
            "1024",
            "--no-cfg",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all({"layout", "fits", "memory_per_rank_bytes", "recommended"} <= set(r) for r in rows)
    assert all({"dp", "cfg", "pp", "ring", "ulysses", "tp", "fsdp", "parallel_vae"} <= set(r["layout"]) for r in rows)
    assert all(isinstance(r["memory_per_rank_bytes"], int) and isinstance(r["fits"], bool) for r in rows)
    recommended = [r for r in rows if r["recommended"]]
    assert len(recommended) == 1 and recommended[0]["fits"]


def test_ldp_plan_table_and_errors(capsys):
    assert (
        ldp_plan(
            [
                str(WAN),
                "--devices",
                "8",
                "--memory",
                "24GiB",
                "--height",
                "720",
                "--width",
                "1280",
                "--frames",
                "81",
                "--cfg-calls",
                "separate",
                "--top",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "75600 tokens" in out and "recommended:" in out and " *" in out
    assert ldp_plan([str(WAN), "--devices", "8", "--height", "721", "--width", "1280"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_sizes_and_rates_parse():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9 and parse_bytes(512) == 512
    assert parse_rate("150TFLOPS", "FLOPS") == 150e12 and parse_rate("25GB/s", "/s") == 25e9
    with pytest.raises(ValueError, match="Cannot read a size"):
        parse_bytes("24 gigs")


def test_auto_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="auto=True chooses the degrees"):
        DiTParallelStrategy(auto=True, ulysses_degree=2)
    with pytest.raises(ValueError, match="options of auto=True"):
        DiTParallelStrategy(tokens=64)
    with pytest.raises(ValueError, match="not planner inputs"):
        DiTParallelStrategy(auto=True, plan_options={"speed": 1})
    DiTParallelStrategy(auto=True, height=256, width=256, memory="8GiB", shard_modules=["text_encoder"])


def test_auto_choice_is_pure_and_sized_from_the_sampler():
    """The same inputs give the same layout (no collective needed); the DiT config's sample size sizes the work."""
    sampler = dit_sampler(build_dit(sample_size=8))
    hints = AutoHints(memory="8GiB")
    args = dict(
        world_size=4,
        nodes=1,
        device=torch.device("cpu"),
        hints=hints,
        axes=Axes(tp=False, parallel_vae=False, pipefusion=False, distrifusion=False),
        shard_text_encoders=False,
        check_inputs=True,
    )
    first, plan = choose_layout(sampler, **args)
    again, _ = choose_layout(sampler, **args)
    assert first.layout == again.layout and first.layout.world_size == 4 and first.exact
    assert plan.grid.tokens == 16  # sample_size 8, patch 2
    assert any(e.layout.cfg == 2 for e in plan.layouts), "a guided DiffusionSampler doubles the batch"
    with pytest.raises(ValueError, match="no layout .* fits"):
        choose_layout(sampler, **{**args, "hints": AutoHints(memory="1MiB")})
    # a module without a guided flag (a pipeline): guidance is assumed on for the estimates, but CFG parallel, which
    # fails on a run without guidance, is only chosen when the hints say guidance is on
    holder = torch.nn.Module()
    holder.transformer = sampler.transformer
    _, unknown = choose_layout(holder, **args)
    assert unknown.layouts and not any(e.layout.cfg > 1 for e in unknown.layouts)
    _, told = choose_layout(holder, **{**args, "hints": AutoHints(memory="8GiB", plan_options={"cfg": True})})
    assert any(e.layout.cfg == 2 for e in told.layouts)


class _Clock:
    """A ``time.perf_counter`` that advances by ``step`` seconds at every call: every timed interval is ``step``."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_calibrate_counts_flops_bytes_and_memory_right(monkeypatch):
    """The figures the planner's time and memory estimates divide by: 2 n^3 FLOP per n x n matrix multiply, the bytes
    of one send per interval (over 2 forked gloo ranks), and the machine's memory (``/proc/meminfo``) shared by the
    devices. With a clock where every interval lasts 0.5 s the rates are exact, so a wrong count fails."""
    from lightning_dit_parallel.planner import calibrate as cal

    monkeypatch.setattr(cal.time, "perf_counter", _Clock(0.5))  # forked ranks inherit it
    assert cal.measure_flops(torch.device("cpu"), torch.float32, size=64, reps=3) == 2 * 64**3 / 0.5
    assert cal.measure_bandwidth(torch.device("cpu"), nbytes=4096, reps=2) == 4096 / 0.5
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert cal.device_memory(torch.device("cpu"), 1) == pytest.approx(total, rel=0.01)
    assert cal.device_memory(torch.device("cpu"), 4) == cal.device_memory(torch.device("cpu"), 1) // 4
    measured = cal.Calibration("cpu", flops=2.5e12, bandwidth=3e9, memory=6 * 2**30)
    assert measured.describe() == "calibrated on cpu: 2.5 TFLOP/s, link 3.00 GB/s, memory 6.0 GiB per device"


def test_approximate_layouts_for_token_counts_that_do_not_divide(flux):
    """PipeFusion's patches and DistriFusion's shards need not divide the tokens (63 x 63 here, odd)."""
    plan = plan_layouts(flux, devices=2, memory="80GiB", height=1008, width=1008, cfg=False)
    assert plan.grid.tokens % 2 == 1
    names = {e.layout.describe() for e in plan.layouts}
    assert any("pipefusion" in n for n in names), sorted(names)
    assert any(e.layout.distrifusion == 2 for e in plan.layouts), sorted(names)
