"""Small seeded models, samplers and data for the tests.

Every builder seeds its weights, so two processes build bit-identical models. ``sharpen_attention``
scales the query and key projections so that attention is peaked: a wrong merge of partial softmax
results or a wrong shard order then changes the output far beyond the test tolerance.
"""

from __future__ import annotations

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_dit_parallel.app.sampling import ClassConditioning, DiffusionSampler, TextConditioning
from lightning_dit_parallel.app.sampling.joint_conditioning import (
    CogVideoXConditioning,
    FluxConditioning,
    SD3Conditioning,
    WanConditioning,
)

# sharpening lives in the package (check_plan uses it); the tests import it from here too
from lightning_dit_parallel.utils.sharpen import (  # noqa: F401
    QK_NORMS,
    QK_PROJECTIONS,
    SHARPNESS,
    sharpen_attention,
)


def build_dit(sample_size: int = 8, heads: int = 4, seed: int = 0, layers: int = 2) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    )
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


def build_pixart(sample_size: int = 8, heads: int = 4, seed: int = 0, layers: int = 2) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=16,
        norm_num_groups=4,
    )
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


def randomize_zero_init(model: nn.Module, seed: int) -> None:
    """DiT-style zero-initialised modulation and output layers make a fresh model output zeros; give every
    parameter that is exactly zero small seeded values so that the whole network contributes."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def dit_sampler(transformer: DiTTransformer2DModel, steps: int = 3, guidance_scale: float = 4.0) -> DiffusionSampler:
    size = transformer.config.sample_size
    return DiffusionSampler(
        transformer,
        DDIMScheduler(num_train_timesteps=100),
        ClassConditioning(null_class=10, out_channels=4),
        latent_shape=(4, size, size),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )


def pixart_sampler(
    transformer: PixArtTransformer2DModel, steps: int = 3, guidance_scale: float = 4.0
) -> DiffusionSampler:
    size = transformer.config.sample_size
    return DiffusionSampler(
        transformer,
        DDIMScheduler(num_train_timesteps=100),
        TextConditioning(out_channels=4),
        latent_shape=(4, size, size),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )


class SampleRequests(Dataset):
    """``n`` requests: global index, a class label and a seeded caption embedding (T=7 tokens, C=16)."""

    def __init__(self, n: int = 2, text_tokens: int = 7) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.labels = torch.arange(n) % 10
        self.embeds = torch.randn(n, text_tokens, 16, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i), "class_label": self.labels[i], "prompt_embeds": self.embeds[i]}


def requests(n: int = 2, batch_size: int = 2, text_tokens: int = 7) -> DataLoader:
    return DataLoader(SampleRequests(n, text_tokens), batch_size=batch_size)


# -- text-conditioned families: SD3, Flux, Wan, CogVideoX ----------------------------------------------------

TEXT_DIM = 16

#: A tiny Wan-family transformer (WanTransformer3DModel and its relatives): head dim 12 = t 4 + h 4 + w 4 of the 3-D
#: rotary, 4 latent channels, 16-wide text.
TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=TEXT_DIM,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=32,
)


def tiny_wan(**overrides) -> dict:
    """The keyword arguments of ``TINY_WAN`` with ``overrides``."""
    return {**TINY_WAN, **overrides}


POOLED_DIM = 8


def build_sd3(heads: int = 4, seed: int = 0) -> SD3Transformer2DModel:
    """MMDiT with one dual-attention layer (joint attention plus image-only attention) and RMS q/k norms."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=8 * heads,
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


def build_flux(heads: int = 4, seed: int = 0) -> FluxTransformer2DModel:
    """One double-stream and one single-stream block; head dim 16 = rotary axes (4, 6, 6)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


def build_wan(heads: int = 4, seed: int = 0) -> WanTransformer3DModel:
    """Video DiT with 3-D rotary (head dim 12 = t 4 + h 4 + w 4) and cross-attention to text."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**tiny_wan(num_attention_heads=heads))
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


def build_cogvideox(
    heads: int = 4, seed: int = 0, rotary: bool = True, text_tokens: int = 16
) -> CogVideoXTransformer3DModel:
    """Video DiT over cat([text, video]) tokens with 3-D rotary embeddings (head dim 16 = t 4 + h 6 + w 6), or
    with ``rotary=False`` sine-cosine position embeddings added in the patch embedding (as CogVideoX-2b; then the
    prompt must have exactly ``text_tokens`` tokens)."""
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        max_text_seq_length=text_tokens,
        use_rotary_positional_embeddings=rotary,
    )
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def sd3_sampler(
    transformer: SD3Transformer2DModel, size: int = 8, steps: int = 3, guidance_scale: float = 4.0
) -> DiffusionSampler:
    """Latents (4, size, size): (size/2)**2 image tokens."""
    return DiffusionSampler(
        transformer,
        flow_scheduler(),
        SD3Conditioning(),
        latent_shape=(4, size, size),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )


def flux_sampler(
    transformer: FluxTransformer2DModel, height: int = 4, width: int = 4, steps: int = 3, guidance_scale: float = 4.0
) -> DiffusionSampler:
    """Packed latents (height * width, 16): height * width image tokens."""
    return DiffusionSampler(
        transformer,
        flow_scheduler(),
        FluxConditioning(height, width),
        latent_shape=(height * width, 16),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )


def wan_sampler(
    transformer: WanTransformer3DModel, frames: int = 2, size: int = 6, steps: int = 3, guidance_scale: float = 4.0
) -> DiffusionSampler:
    """Latents (4, frames, size, size): frames * (size/2)**2 video tokens."""
    return DiffusionSampler(
        transformer,
        flow_scheduler(),
        WanConditioning(),
        latent_shape=(4, frames, size, size),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )


def cogvideox_sampler(
    transformer: CogVideoXTransformer3DModel,
    frames: int = 2,
    size: int = 6,
    steps: int = 3,
    guidance_scale: float = 4.0,
) -> DiffusionSampler:
    """Latents (frames, 4, size, size): frames * (size/2)**2 video tokens; v-prediction DDIM as CogVideoX."""
    scheduler = DDIMScheduler(
        num_train_timesteps=100, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    )
    return DiffusionSampler(
        transformer,
        scheduler,
        CogVideoXConditioning(),
        latent_shape=(frames, 4, size, size),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )


class TextRequests(Dataset):
    """``n`` requests: global index, a seeded text embedding (T, TEXT_DIM) and a pooled one (POOLED_DIM,)."""

    def __init__(self, n: int = 2, text_tokens: int = 7) -> None:
        generator = torch.Generator().manual_seed(4321)
        self.embeds = torch.randn(n, text_tokens, TEXT_DIM, generator=generator)
        self.pooled = torch.randn(n, POOLED_DIM, generator=generator)

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i), "prompt_embeds": self.embeds[i], "pooled_embeds": self.pooled[i]}


def text_requests(n: int = 2, batch_size: int = 2, text_tokens: int = 7) -> DataLoader:
    return DataLoader(TextRequests(n, text_tokens), batch_size=batch_size)


#: The two families every parallelizer is tested on first (self-attention only; plus cross-attention).
FAMILIES = {"dit": (build_dit, dit_sampler), "pixart": (build_pixart, pixart_sampler)}
