"""Parallel VAE decode of the video VAEs (CogVideoX, LTX-Video, HunyuanVideo, Mochi) and Sana's DC-AE: the latent cut
into bands along the height equals the one-process decode (float32, relative 1e-5) on 4 ranks and on 2 ranks (the
pairs {0, 1} and {2, 3} of the same launch), with heights that divide neither; clear errors on every rank where a
decode cannot be banded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_dit_parallel.parallel.vae import apply_parallel_vae, band_rows, find_vaes, vae_cut_for
from lightning_dit_parallel.parallel.vae.attention import _frame_causal_mask, _frame_major, _frames_of
from lightning_dit_parallel.parallel.vae.bands import Bands
from lightning_dit_parallel.parallel.vae.noise import band_noise
from lightning_dit_parallel.parallel.vae.parallelize import _inspect
from tests.distributed import run_on_ranks
from tests.video_vaes import BUILDERS

FUNCTIONS = ("group_norm", "interpolate", "scaled_dot_product_attention", "batch_norm")
ORIGINAL = {name: getattr(F, name) for name in FUNCTIONS}
RANDN = torch.randn

#: (vae, latent shape (B, C, F, H, W) or (B, C, H, W), decoder calls per decode). Heights 5, 7 and 9 divide neither 2
#: nor 4; 5 on 4 ranks leaves bands of one latent row (the whole band convolved again with both halos). CogVideoX
#: decodes 5 latent frames in two calls (the causal convolutions' cached frames carried per band); HunyuanVideo's
#: frame-causal attention sees 3 frames; LTX decodes a batch of 2 with a timestep each.
CASES = [
    ("cogvideox", (1, 4, 5, 5, 4), 2),
    ("cogvideox", (1, 4, 2, 7, 3), 1),
    ("ltx", (2, 4, 2, 5, 3), 1),
    ("ltx", (1, 4, 1, 7, 4), 1),
    ("hunyuan", (1, 4, 3, 5, 4), 1),
    ("hunyuan", (1, 4, 2, 7, 3), 1),
    ("mochi", (1, 4, 2, 5, 4), 1),
    ("mochi", (1, 4, 3, 7, 3), 1),
    ("dc", (2, 4, 9, 4), 1),
    ("dc", (1, 4, 11, 5), 1),
]


def _latent(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _decode(vae: nn.Module, name: str, z: torch.Tensor) -> torch.Tensor:
    """One decode; LTX with a timestep per sample and its injected noise drawn from a fixed seed."""
    extra = {"temb": torch.linspace(0.05, 0.5, z.shape[0])} if name == "ltx" else {}
    torch.manual_seed(11)
    with torch.no_grad():
        return vae.decode(z, **extra).sample


def _banded(vae: nn.Module, name: str, z: torch.Tensor, group) -> tuple[torch.Tensor, list[int], int]:
    """The banded decode over ``group``, the heights the decoder's first convolution saw, the decoder calls."""
    parallel = apply_parallel_vae(vae, vae_cut_for(vae), group)
    seen: list[int] = []
    probe = vae.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2]))
    try:
        out = _decode(vae, name, z)
    finally:
        probe.remove()
        parallel.remove()
    return out, seen, parallel.calls


def _all_cases(rank: int, world: int) -> dict:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    results = []
    for index, (name, shape, calls) in enumerate(CASES):
        vae = BUILDERS[name]()
        z = _latent(shape, index)
        reference = _decode(vae, name, z)
        for ranks, group in ((world, dist.group.WORLD), (2, pairs[rank // 2])):
            out, seen, made = _banded(vae, name, z, group)
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            results.append(
                {
                    "case": f"{name} {shape} on {ranks} ranks",
                    "error": error,
                    "seen": sorted(set(seen)),
                    "band": band_rows(shape[-2], ranks)[rank % ranks],
                    "calls": made,
                    "expected_calls": calls,
                    "shape_ok": out.shape == reference.shape,
                    "restored": {n: getattr(F, n) for n in FUNCTIONS} == ORIGINAL and torch.randn is RANDN,
                }
            )
        results[-1]["after"] = torch.equal(_decode(vae, name, z), reference)  # the hooks are gone: plain again
    errors = {}
    # DC-AE on bands of one latent row x 4 columns: its linear attention would take the quadratic branch
    vae = BUILDERS["dc"]()
    parallel = apply_parallel_vae(vae, vae_cut_for(vae), dist.group.WORLD)
    try:
        _decode(vae, "dc", _latent((1, 4, 4, 4), 0))
        errors["quadratic"] = "no error"
    except ValueError as err:
        errors["quadratic"] = str(err)
    finally:
        parallel.remove()
    # LTX's timestep not declared replicated: refused before any collective
    vae = BUILDERS["ltx"]()
    parallel = apply_parallel_vae(vae, dataclasses.replace(vae_cut_for(vae), replicated=()), dist.group.WORLD)
    try:
        _decode(vae, "ltx", _latent((1, 4, 1, 5, 4), 0))
        errors["replicated"] = "no error"
    except ValueError as err:
        errors["replicated"] = str(err)
    finally:
        parallel.remove()
    # LTX's noise maps come from the global random state: a rank-dependent seed is refused on every rank
    parallel = apply_parallel_vae(vae, vae_cut_for(vae), dist.group.WORLD)
    torch.manual_seed(rank % 2)
    try:
        with torch.no_grad():
            vae.decode(_latent((1, 4, 1, 5, 4), 0), temb=torch.tensor([0.1]))
        errors["random_state"] = "no error"
    except ValueError as err:
        errors["random_state"] = str(err)
    finally:
        parallel.remove()
    errors["restored"] = {n: getattr(F, n) for n in FUNCTIONS} == ORIGINAL and torch.randn is RANDN
    return {"cases": results, "errors": errors}


def test_video_vaes_banded_decode_equals_one_process_on_4_and_2_ranks():
    results = run_on_ranks(4, _all_cases, timeout_s=300)
    for rank, r in enumerate(results):
        assert len(r["cases"]) == 2 * len(CASES)
        for case in r["cases"]:
            what = f"rank {rank}, {case['case']}"
            assert case["shape_ok"], what
            assert case["seen"] == [case["band"]], f"{what}: the decoder ran on {case['seen']} rows, not its band"
            assert case["calls"] == case["expected_calls"], f"{what}: {case['calls']} banded decoder calls"
            assert case["error"] <= 1e-5, f"{what}: max relative error {case['error']:.2e}"
            assert case["restored"], f"{what}: torch.nn.functional or torch.randn not restored"
            assert case.get("after", True), f"{what}: decode after remove() differs"
        errors = r["errors"]
        assert "attention_head_dim=4" in errors["quadratic"] and "[1, 1, 1, 1] rows" in errors["quadratic"], errors
        assert "['temb']" in errors["replicated"], errors
        assert "differs on ranks [1, 3] from rank 0" in errors["random_state"], errors
        assert errors["restored"]


# -- no process group -----------------------------------------------------------------------------------------


def test_the_five_classes_have_cuts():
    module = nn.ModuleDict({name: build() for name, build in BUILDERS.items()})
    found = {path: type(vae).__name__ for path, vae, _ in find_vaes(module)}
    assert found == {
        "cogvideox": "AutoencoderKLCogVideoX",
        "ltx": "AutoencoderKLLTXVideo",
        "hunyuan": "AutoencoderKLHunyuanVideo",
        "mochi": "AutoencoderKLMochi",
        "dc": "AutoencoderDC",
    }


def test_causal_convolutions_are_banded_where_the_height_is_padded():
    # CogVideoX (pad_mode="first"): the nn.Conv3d child pads the height; Mochi (replicate) and HunyuanVideo: the
    # wrapper pads it with F.pad, so the wrapper is banded
    for name, banded in (
        ("cogvideox", {"CogVideoXSafeConv3d", "Conv2d"}),
        ("mochi", {"CogVideoXCausalConv3d"}),
        ("hunyuan", {"HunyuanVideoCausalConv3d"}),
    ):
        vae = BUILDERS[name]()
        found = _inspect(vae.decoder, vae_cut_for(vae))
        kinds = {type(module).__name__ for module, _ in found.halos}
        assert kinds == banded, (name, kinds)  # CogVideoX's Conv2d: its upsamplers'
    vae = BUILDERS["dc"]()
    found = _inspect(vae.decoder, vae_cut_for(vae))
    assert [type(m).__name__ for _, m in found.linear] == ["SanaMultiscaleLinearAttention"] * 2
    assert {halo.top for _, halo in found.halos} == {1, 2}  # 3 x 3 and the 5 x 5 multi-scale projections


def test_circular_padding_of_a_wrapper_is_refused_at_installation():
    vae = BUILDERS["hunyuan"]()
    vae.decoder.up_blocks[0].resnets[0].conv1.pad_mode = "circular"
    with pytest.raises(ValueError, match=r"up_blocks.0.resnets.0.conv1 \(HunyuanVideoCausalConv3d\): circular"):
        apply_parallel_vae(vae, vae_cut_for(vae), group=None)
    assert not vae.decoder.conv_in._forward_pre_hooks  # nothing installed


def test_ltx_noise_is_drawn_and_banded_draws_match_the_whole_map():
    vae = BUILDERS["ltx"]()
    z = _latent((1, 4, 1, 5, 4), 0)
    with torch.no_grad():
        first = vae.decode(z, temb=torch.tensor([0.1]), return_dict=False)[0]
        second = vae.decode(z, temb=torch.tensor([0.1]), return_dict=False)[0]
    assert not torch.equal(first, second)  # the noise is drawn (and matters) in the tiny VAE
    whole = torch.randn((12, 5), generator=torch.Generator().manual_seed(3))
    for rank, (start, rows) in enumerate(((0, 6), (6, 3), (9, 3))):  # latent rows (2, 1, 1) upsampled 3x
        bands = Bands((2, 1, 1), rank, -2)
        noise = band_noise(RANDN, lambda where: bands, "noise")((rows, 5), generator=torch.Generator().manual_seed(3))
        assert torch.equal(noise, whole[start : start + rows])


def test_frame_causal_masks():
    mask = _frame_causal_mask(6, 6, 3, torch.zeros(1))  # 3 frames of 2 tokens, additive
    assert _frames_of(mask[None, None], 6, "attn") == 3
    assert _frames_of(torch.zeros(6, 6), 6, "attn") == 1  # one frame: no constraint
    band = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() <= 1  # a sliding window: row 0 sees 2 keys
    with pytest.raises(ValueError, match="not block-causal over frames"):
        _frames_of(band, 6, "attn")
    # two bands of (1, 2) rows x 1 column, 2 frames: band-major (f0 a, f1 a, f0 b b, f1 b b) -> frame-major
    kv = torch.tensor([10, 11, 20, 21, 22, 23]).float().view(1, 6, 1)
    assert _frame_major(kv, [2, 4], 2).flatten().tolist() == [10, 20, 21, 11, 22, 23]
