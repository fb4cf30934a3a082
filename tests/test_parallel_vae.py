"""Parallel VAE decode: the latent cut into bands along the height over 2 and 4 gloo ranks equals the one-process
decode (float32, relative 1e-5) for AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLWan (2.1 and 2.2) and
AutoencoderKLQwenImage, with even and uneven band heights; each data-parallel group decodes its own latents; clear
errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderTiny
from torch import nn

from lightning_dit_parallel import DiTParallelStrategy, ParallelLayout, parallelize
from lightning_dit_parallel.parallel.vae import (
    BandGroup,
    VaeCut,
    apply_parallel_vae,
    band_rows,
    find_vaes,
    register_vae_cut,
    unregister_vae_cut,
    vae_cut_for,
)
from lightning_dit_parallel.parallel.vae.comm import gather_bands
from lightning_dit_parallel.parallel.vae.conv import conv_halo
from lightning_dit_parallel.parallel.vae.norm import band_group_norm
from tests.distributed import run_on_ranks
from tests.vaes import flux2_vae, image_vae, qwen_vae, wan_vae

BUILDERS = {
    "kl": image_vae,
    "flux2": flux2_vae,
    "wan": wan_vae,
    "wan22": lambda: wan_vae(residual=True),
    "qwen": qwen_vae,
}
FUNCTIONS = ("group_norm", "interpolate", "scaled_dot_product_attention")
ORIGINAL = {name: getattr(F, name) for name in FUNCTIONS}

#: (vae, latent shape): images (B, C, H, W), videos (B, C, F, H, W); heights that do and do not divide the ranks.
CASES = {
    2: [
        ("kl", (2, 4, 8, 6)),
        ("kl", (1, 4, 7, 5)),
        ("flux2", (1, 4, 5, 4)),
        ("wan", (1, 4, 2, 4, 5)),
        ("wan", (1, 4, 3, 3, 5)),
        ("wan22", (1, 4, 2, 3, 4)),
        ("qwen", (1, 4, 2, 5, 3)),
    ],
    4: [
        ("kl", (1, 4, 8, 5)),
        ("kl", (1, 4, 9, 5)),
        ("kl", (2, 4, 6, 7)),
        ("flux2", (1, 4, 6, 3)),
        ("wan", (1, 4, 2, 4, 6)),
        ("wan", (1, 4, 2, 5, 4)),
        ("wan22", (1, 4, 2, 6, 3)),
        ("qwen", (1, 4, 2, 7, 3)),
    ],
}


def _latent(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _decode_in_bands(vae: nn.Module, z: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """The banded decode of ``z`` over ``group`` and the heights the decoder's mid block saw (its band's rows)."""
    parallel = apply_parallel_vae(vae, vae_cut_for(vae), group)
    seen: list[int] = []
    probe = vae.decoder.mid_block.register_forward_pre_hook(lambda m, args, *rest: seen.append(args[0].shape[-2]))
    try:
        with torch.no_grad():
            out = vae.decode(z).sample
    finally:
        probe.remove()
        parallel.remove()
    assert parallel.calls == (z.shape[2] if z.dim() == 5 else 1)  # Wan decodes frame by frame
    assert {name: getattr(F, name) for name in FUNCTIONS} == ORIGINAL, "torch.nn.functional not restored"
    return out, seen


def _exact(rank: int, world: int) -> list[dict]:
    results = []
    for index, (name, shape) in enumerate(CASES[world]):
        vae = BUILDERS[name]()
        z = _latent(shape, index)
        with torch.no_grad():
            reference = vae.decode(z).sample
        out, seen = _decode_in_bands(vae, z, dist.group.WORLD)
        with torch.no_grad():
            after = vae.decode(z).sample  # the hooks are gone: the plain decode again
        error = ((out - reference).abs().max() / reference.abs().max()).item()
        results.append(
            {
                "case": f"{name} {shape}",
                "error": error,
                "seen": sorted(set(seen)),
                "band": band_rows(shape[-2], world)[rank],
                "restored": torch.equal(after, reference),
                "shape_ok": out.shape == reference.shape,
            }
        )
    return results


def _check(results: list[list[dict]]) -> None:
    for rank, cases in enumerate(results):
        for case in cases:
            what = f"rank {rank}, {case['case']}"
            assert case["shape_ok"], what
            assert case["seen"] == [case["band"]], f"{what}: the decoder ran on {case['seen']} rows, not its band"
            assert case["error"] <= 1e-5, f"{what}: max relative error {case['error']:.2e}"
            assert case["restored"], f"{what}: decode after remove() differs"


def _two_ranks(rank: int, world: int) -> dict:
    # the group norm alone, on uneven bands (rows 4 and 3 of 7): float32 and the half-precision path
    band = BandGroup.of(dist.group.WORLD)
    norms = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 12, 7, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2).to(dtype)
        weight, bias = torch.linspace(0.5, 2, 12).to(dtype), torch.linspace(-1, 1, 12).to(dtype)
        reference = F.group_norm(x.float(), 3, weight.float(), bias.float(), 1e-6)
        rows = band_rows(7, world)
        own = x.narrow(-2, sum(rows[:rank]), rows[rank])
        out = band_group_norm(own, 3, weight, bias, 1e-6, band)
        whole = gather_bands(out.float().contiguous(), -2, rows, band)
        norms[str(dtype)] = ((whole - reference).abs().max() / reference.abs().max()).item()
    return {"cases": _exact(rank, world), "norms": norms}


def test_banded_decode_equals_one_process_on_2_ranks():
    results = run_on_ranks(2, _two_ranks, timeout_s=300)
    _check([r["cases"] for r in results])
    for r in results:
        assert r["norms"]["torch.float32"] <= 1e-6, r["norms"]
        assert r["norms"]["torch.bfloat16"] <= 2**-7, r["norms"]  # the output's bfloat16 rounding


def _four_ranks(rank: int, world: int) -> dict:
    results = _exact(rank, world)
    # each data-parallel group (ranks {0, 1} and {2, 3}) decodes its own latents in bands over its two ranks
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_index = rank // 2
    vae = image_vae()
    z = _latent((1, 4, 7, 6), 100 + dp_index)
    with torch.no_grad():
        reference = vae.decode(z).sample
    out, seen = _decode_in_bands(vae, z, groups[dp_index])
    dp_error = ((out - reference).abs().max() / reference.abs().max()).item()
    # a latent too short to band: the same ValueError on every rank, before any collective; the hooks stay usable
    parallel = apply_parallel_vae(vae, vae_cut_for(vae), dist.group.WORLD)
    try:
        with torch.no_grad():
            vae.decode(_latent((1, 4, 3, 4), 5))
        too_short = "no error"
    except ValueError as err:
        too_short = str(err)
    restored = {name: getattr(F, name) for name in FUNCTIONS} == ORIGINAL
    with torch.no_grad():
        z = _latent((1, 4, 5, 4), 6)
        banded = vae.decode(z).sample
    parallel.remove()
    with torch.no_grad():
        plain = vae.decode(z).sample
    after_error = ((banded - plain).abs().max() / plain.abs().max()).item()
    return {
        "cases": results,
        "dp_error": dp_error,
        "dp_seen": seen,
        "dp_band": band_rows(7, 2)[rank % 2],
        "dp_output": out.sum().item(),
        "too_short": too_short,
        "restored": restored,
        "after_error": after_error,
    }


def test_banded_decode_on_4_ranks_data_parallel_groups_and_a_latent_too_short():
    results = run_on_ranks(4, _four_ranks, timeout_s=300)
    _check([r["cases"] for r in results])
    for rank, r in enumerate(results):
        assert r["dp_error"] <= 1e-5, f"rank {rank}: dp group decode, max relative error {r['dp_error']:.2e}"
        assert set(r["dp_seen"]) == {r["dp_band"]}, f"rank {rank}: decoded {r['dp_seen']} rows in its dp group"
        assert "A latent of height 3 cannot be cut into 4 bands" in r["too_short"], r["too_short"]
        assert r["restored"] and r["after_error"] <= 1e-5
    assert results[0]["dp_output"] == results[1]["dp_output"] != results[2]["dp_output"] == results[3]["dp_output"]


# -- no process group -----------------------------------------------------------------------------------------


def test_band_rows_even_uneven_and_too_short():
    assert band_rows(8, 2) == (4, 4)
    assert band_rows(9, 4) == (3, 2, 2, 2)
    assert band_rows(4, 4) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="height 3 cannot be cut into 4 bands"):
        band_rows(3, 4)


def test_cuts_are_found_by_class():
    module = nn.Module()
    module.vae = image_vae()
    module.video = wan_vae()
    found = find_vaes(module)
    names = [(path, type(vae).__name__) for path, vae, _ in found]
    assert names == [("vae", "AutoencoderKL"), ("video", "AutoencoderKLWan")]
    assert found[1][2].padding_attributes == {"WanCausalConv3d": "_padding"}


def _tiny_autoencoder() -> AutoencoderTiny:
    return AutoencoderTiny(
        encoder_block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        num_encoder_blocks=(1,),
        num_decoder_blocks=(1,),
        latent_channels=4,
        upsampling_scaling_factor=1,
    )


def test_unsupported_vae_class_and_no_vae_are_clear_errors():
    module = nn.Module()
    module.vae = _tiny_autoencoder()
    with pytest.raises(ValueError, match=r"AutoencoderTiny \(vae\) has no parallel decode; VAE classes with one: \["):
        find_vaes(module)
    # through parallelize, also where no model parallelism is requested (checked before anything else)
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        parallelize(module, ParallelLayout().resolve(1), None, parallel_vae=True)
    with pytest.raises(ValueError, match="no submodule of Module is a VAE with a parallel decode"):
        find_vaes(nn.Module())
    with pytest.raises(ValueError, match="parallel_vae must be a bool"):
        DiTParallelStrategy(ulysses_degree=2, parallel_vae="yes")


def test_own_vae_class_registers_a_cut():
    class MyVae(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = nn.Conv2d(4, 3, 3, padding=1)

    assert vae_cut_for(MyVae) is None
    register_vae_cut(MyVae, VaeCut(decoder="decoder"))
    try:
        assert [path for path, _, _ in find_vaes(nn.ModuleDict({"mine": MyVae()}))] == ["mine"]
    finally:
        unregister_vae_cut(MyVae)


@pytest.mark.parametrize(
    "conv, message",
    [
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), "stride 2 along the height"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate"), "padding_mode='replicate'"),
        (nn.Conv2d(4, 4, 3, padding=0), "changes it"),
        (nn.ConvTranspose2d(4, 4, 3), "transposed"),
    ],
)
def test_convolutions_that_cannot_be_banded(conv: nn.Module, message: str):
    with pytest.raises(ValueError, match=message):
        conv_halo(conv, "decoder.layer", -2, None)


def test_decoder_layers_that_cannot_be_banded_fail_at_installation():
    vae = image_vae()
    vae.decoder.up_blocks[0].upsamplers.append(nn.Upsample(scale_factor=2, mode="bilinear"))
    with pytest.raises(ValueError, match=r"decoder.up_blocks.0.upsamplers.1 \(Upsample\): mode='bilinear'"):
        apply_parallel_vae(vae, vae_cut_for(vae), group=None)
    vae = image_vae()
    vae.decoder.conv_out = nn.Conv2d(8, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="decoder.conv_out"):
        apply_parallel_vae(vae, vae_cut_for(vae), group=None)
    assert not vae.decoder._forward_pre_hooks and not vae.decoder.conv_in._forward_pre_hooks  # nothing installed


def test_conv_halo_and_padding_without_the_height():
    conv = nn.Conv2d(4, 4, (3, 5), padding=(1, 2))
    halo = conv_halo(conv, "decoder.conv", -2, None)
    assert (halo.top, halo.bottom, halo.unpadded) == (1, 1, (0, 2)) and conv.padding == (1, 2)
    assert conv_halo(nn.Conv2d(4, 4, 1), "decoder.shortcut", -2, None) is None
    causal = wan_vae().decoder.conv_in  # WanCausalConv3d: F.pad order (w, w, h, h, 2t, 0)
    halo = conv_halo(causal, "decoder.conv_in", -2, "_padding")
    assert (halo.top, halo.bottom, halo.original, halo.unpadded) == (1, 1, (1, 1, 1, 1, 2, 0), (1, 1, 0, 0, 2, 0))


@pytest.mark.parametrize("strategy", ["ulysses", "hybrid", "tp", "distrifusion"])
def test_strategy_config_switches_it_on(strategy: str):
    from hydra.utils import instantiate

    from tests.test_cli import compose_predict

    cfg = compose_predict([f"strategy={strategy}", "strategy.parallel_vae=true"])
    assert instantiate(cfg.strategy)._parallel_vae is True


# -- CUDA (NCCL) ----------------------------------------------------------------------------------------------


def _cuda_exact(rank: int, world: int) -> list[dict]:
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions and matmuls in full precision, as on CPU
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", rank)
    results = []
    for index, (name, shape) in enumerate([("kl", (2, 4, 9, 6)), ("wan", (1, 4, 2, 5, 4)), ("wan22", (1, 4, 2, 3, 4))]):
        vae = BUILDERS[name]().to(device)
        z = _latent(shape, index).to(device)
        with torch.no_grad():
            reference = vae.decode(z).sample
        out, seen = _decode_in_bands(vae, z, dist.group.WORLD)
        error = ((out - reference).abs().max() / reference.abs().max()).item()
        results.append(
            {
                "case": f"{name} {shape} cuda",
                "error": error,
                "seen": sorted(set(seen)),
                "band": band_rows(shape[-2], world)[rank],
                "restored": True,
                "shape_ok": out.shape == reference.shape,
            }
        )
    return results


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, one GPU per rank)")
def test_banded_decode_on_cuda_with_nccl():
    _check(run_on_ranks(2, _cuda_exact, backend="nccl", timeout_s=300))
