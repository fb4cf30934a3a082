"""Small seeded models, samplers and data for the tests.

Every builder seeds its weights, so two processes build bit-identical models. ``sharpen_attention``
scales the query and key projections so that attention is peaked: a wrong merge of partial softmax
results or a wrong shard order then changes the output far beyond the test tolerance.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_dit_parallel.sampling import ClassConditioning, DiffusionSampler, TextConditioning

SHARPNESS = 6.0


def sharpen_attention(model: nn.Module, factor: float = SHARPNESS) -> nn.Module:
    """Multiply every attention query and key projection by ``factor`` (logits grow by factor**2)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "add_q_proj", "add_k_proj") and isinstance(module, nn.Linear):
                module.weight.mul_(factor)
    return model


def build_dit(sample_size: int = 8, heads: int = 4, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    )
    randomize_zero_init(model, seed)
    return sharpen_attention(model.eval())


def build_pixart(sample_size: int = 8, heads: int = 4, seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=sample_size, patch_size=2, cross_attention_dim=32, caption_channels=16, norm_num_groups=4,
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
        transformer, DDIMScheduler(num_train_timesteps=100), ClassConditioning(null_class=10, out_channels=4),
        latent_shape=(4, size, size), num_inference_steps=steps, guidance_scale=guidance_scale,
    )


def pixart_sampler(transformer: PixArtTransformer2DModel, steps: int = 3, guidance_scale: float = 4.0) -> DiffusionSampler:
    size = transformer.config.sample_size
    return DiffusionSampler(
        transformer, DDIMScheduler(num_train_timesteps=100), TextConditioning(out_channels=4),
        latent_shape=(4, size, size), num_inference_steps=steps, guidance_scale=guidance_scale,
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
