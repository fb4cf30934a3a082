"""Tiny seeded diffusers VAEs for the parallel decode tests: group norms of several groups with random affine
weights, a mid-block attention with sharpened queries and keys (a wrong merge of bands cannot hide behind
near-uniform attention)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, AutoencoderKLWan
from torch import nn

from lightning_dit_parallel.utils.sharpen import SHARPNESS, sharpen_attention


def _randomize_norms(model: nn.Module, seed: int) -> None:
    """Group/RMS-norm weights around 1 and biases around 0, seeded: the affine part must be applied per channel."""
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ not in ("GroupNorm", "WanRMS_norm", "QwenImageRMS_norm"):
                continue
            for name in ("weight", "bias", "gamma"):
                p = getattr(module, name, None)
                if isinstance(p, nn.Parameter):
                    base = 0.0 if name == "bias" else 1.0
                    p.copy_(base + 0.3 * torch.randn(p.shape, generator=generator))


def _sharpen_fused_qkv(model: nn.Module, factor: float = SHARPNESS) -> None:
    """Scale the query and key rows of the fused 1x1 ``to_qkv`` convolutions of Wan-style attention blocks."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("to_qkv") and isinstance(module, nn.Conv2d):
                rows = 2 * module.out_channels // 3
                module.weight[:rows].mul_(factor)
                module.bias[:rows].mul_(factor)


def image_vae(seed: int = 0) -> AutoencoderKL:
    """AutoencoderKL with three levels (4x upsampling in the decoder), 4 groups of 2-4 channels, mid-block attention."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).eval()
    _randomize_norms(vae, seed)
    return sharpen_attention(vae)


def flux2_vae(seed: int = 0) -> AutoencoderKLFlux2:
    """Flux.2's AutoencoderKL variant (the same decoder class), two levels, 4 groups, mid-block attention."""
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    _randomize_norms(vae, seed)
    return sharpen_attention(vae)


def wan_vae(seed: int = 0, residual: bool = False) -> AutoencoderKLWan:
    """Causal 3-D VAE, 8x spatial and 4x temporal compression, mid-block attention. ``residual``: the Wan 2.2 layout
    (residual up blocks with depth-to-space shortcuts, 2x2 patches unpatchified after the decoder)."""
    torch.manual_seed(seed)
    extra = {}
    if residual:
        extra = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
        **extra,
    ).eval()
    _randomize_norms(vae, seed)
    _sharpen_fused_qkv(vae)
    return vae


def qwen_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    """QwenImage's causal 3-D VAE (Wan's design), 8x spatial compression, mid-block attention."""
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    _randomize_norms(vae, seed)
    _sharpen_fused_qkv(vae)
    return vae
