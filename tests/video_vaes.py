"""Tiny seeded diffusers video VAEs (and Sana's DC-AE) for the parallel decode tests: several norm groups with random
affine weights, random per-channel scales and timestep tables (zero at initialisation in diffusers), sharpened
attention (a wrong merge of bands cannot hide behind near-uniform attention)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
)
from torch import nn

from lightning_dit_parallel.utils.sharpen import sharpen_attention


def _randomize(model: nn.Module, seed: int) -> None:
    """Norm weights around 1 and biases around 0; LTX's noise scales and timestep tables and every other parameter
    that diffusers initialises to zero made non-zero (seeded), so each one has to be applied per band exactly."""
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            norm = any(part in name for part in ("norm", "scale_shift_table"))
            if leaf.startswith("per_channel_scale") or (not p.abs().sum() and leaf != "bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            elif norm and leaf in ("weight", "gamma"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=generator))
            elif norm and leaf in ("bias", "beta"):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def cogvideox_vae(seed: int = 0) -> AutoencoderKLCogVideoX:
    """CogVideoX: causal 3-D convolutions with cached frames, spatial norms conditioned on the latent, 4x spatial and
    2x temporal upsampling, decoded two latent frames at a time."""
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=2,
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
    ).eval()
    _randomize(vae, seed)
    return vae


def ltx_vae(seed: int = 0, timestep: bool = True) -> AutoencoderKLLTXVideo:
    """LTX-Video 0.9.1-style: depth-to-space upsampling, per-channel RMS norms, timestep conditioning, noise injected
    in the decoder, 2x2 patches."""
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(True, False, True, False, True),
        upsample_residual=(True, True, False, False),
        upsample_factor=(2, 1, 1, 1),
        timestep_conditioning=timestep,
        patch_size=2,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    _randomize(vae, seed)
    return vae


def hunyuan_vae(seed: int = 0) -> AutoencoderKLHunyuanVideo:
    """HunyuanVideo: causal 3-D convolutions with replicate padding, frame-causal mid-block attention, 4x spatial and
    4x temporal upsampling."""
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
    ).eval()
    _randomize(vae, seed)
    return sharpen_attention(vae)


def mochi_vae(seed: int = 0) -> AutoencoderKLMochi:
    """Mochi: replicate-padded causal convolutions, per-frame (chunked) group norms of 32 groups, linear
    depth-to-space upsampling, 4x spatial and 2x temporal."""
    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(
        in_channels=15,
        out_channels=3,
        latent_channels=4,
        encoder_block_out_channels=(32, 32, 64),
        decoder_block_out_channels=(32, 32, 64),
        layers_per_block=(1, 1, 1),
        temporal_expansions=(1, 2),
        spatial_expansions=(2, 2),
        add_attention_block=(False, True, True),
    ).eval()
    _randomize(vae, seed)
    return vae


def dc_vae(seed: int = 0) -> AutoencoderDC:
    """Sana's DC-AE: pixel-shuffle upsampling, RMS norms, multi-scale linear attention (depthwise 5x5 projections)."""
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 16),
        decoder_block_out_channels=(8, 8, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (5,), (5,)),
        decoder_qkv_multiscales=((), (5,), (5,)),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    ).eval()
    _randomize(vae, seed)
    return vae


BUILDERS = {"cogvideox": cogvideox_vae, "ltx": ltx_vae, "hunyuan": hunyuan_vae, "mochi": mochi_vae, "dc": dc_vae}
