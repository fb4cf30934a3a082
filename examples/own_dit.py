"""Bring your own DiT: a class-conditional DiT in the style of facebookresearch/DiT, made sequence parallel by
one ``dit_plan`` class attribute.

    python examples/own_dit.py --devices 2 --ulysses 2
    python examples/own_dit.py --devices 4 --ulysses 2 --ring 2 --size 10    # 25 tokens: padded shards

The model (``x_embedder``, ``blocks``, ``final_layer``) follows DiT's ``models.py``; its attention calls
``F.scaled_dot_product_attention`` through the ``torch.nn.functional`` module, which is what the sequence-parallel
hooks swap. Lightning's default launcher re-runs this script for the other ranks; every rank computes the same
full samples, and the script checks them against a one-process run of the same seeded model.
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_dit_parallel import DiTPlan, SequenceParallelStrategy, Split
from lightning_dit_parallel.app.sampling import DiffusionSampler


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, hidden): sinusoidal frequencies, then an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 64) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (N, hidden)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (as timm's, used by DiT)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3D) -> (N, T, 3, H, Dh)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (N, T, 3, H, Dh) -> (3, N, H, T, Dh)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, H, T, Dh) -> (N, T, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention and MLP, both modulated by the conditioning ``c``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_mlp), nn.GELU(approximate="tanh"), nn.Linear(hidden_mlp, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """(N, T, hidden) -> (N, T, patch * patch * out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional Diffusion Transformer on latents (N, C, size, size); learns sigma (2C output channels)."""

    #: How the sequence-parallel strategies run this DiT; this is the only parallel code it needs.
    dit_plan = DiTPlan(
        # The tokens exist as one tensor only after `x_embedder(x) + pos_embed` inside forward(), so they are cut
        # where the first block receives them: (N, T, D) -> (N, T/n, D), zero-padded when n does not divide T.
        split_module_inputs={"blocks.0": {"x": Split("image", 1)}},
        # (N, T/n, p*p*2C) -> (N, T, p*p*2C) before unpatchify (padding dropped).
        gather_outputs={"final_layer": Split("image", 1)},
        blocks=("blocks",),
        self_attention={"blocks.*.attn": ("image",)},
    )

    def __init__(
        self,
        input_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels, self.out_channels = in_channels, 2 * in_channels
        self.num_classes = num_classes
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # the last class is "unconditional"
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, input_size // patch_size), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, h, p, p, c)  # (N, T, p*p*C) -> (N, h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) class labels -> (N, 2C, H, W)."""
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D), T = H*W/p**2
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*2C)
        return self.unpatchify(x)  # (N, 2C, H, W)


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """(1, grid*grid, dim) fixed 2-D sine-cosine position embedding, half the channels per axis."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = [torch.outer(axis.flatten().double(), omega) for axis in (cols, rows)]  # 2 x (grid*grid, dim/4)
    return torch.cat([f(a) for a in parts for f in (torch.sin, torch.cos)], dim=1).float()[None]


class DiTConditioning:
    """Calls ``DiT(x, t, y)``; the unconditional half gets the null class; the learned-sigma channels are dropped."""

    def __call__(self, transformer: DiT, latents: Tensor, timestep: Tensor, batch: dict, guided: bool) -> Tensor:
        labels = batch["class_label"].to(latents.device)
        if guided:
            labels = torch.cat([torch.full_like(labels, transformer.num_classes), labels])  # (B,) -> (2B,)
        out = transformer(latents, timestep.expand(latents.shape[0]), labels)  # (2B, 2C, H, W)
        return out[:, : transformer.in_channels]


def make_module(transformer: DiT, steps: int = 4, guidance_scale: float = 4.0) -> DiffusionSampler:
    """The sampling LightningModule: DDIM with classifier-free guidance over ``transformer``."""
    size = transformer.input_size
    return DiffusionSampler(
        transformer,
        DDIMScheduler(num_train_timesteps=100, clip_sample=False),
        DiTConditioning(),
        latent_shape=(transformer.in_channels, size, size),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    )


def requests(n: int, batch_size: int = 2) -> DataLoader:
    items = [{"index": torch.tensor(i), "class_label": torch.tensor(i % 10)} for i in range(n)]
    return DataLoader(items, batch_size=batch_size)


def check_plan_factory() -> tuple[DiT, dict[str, Tensor]]:
    """``ldp-check-plan examples/own_dit.py:check_plan_factory``: a small seeded DiT and one forward's inputs, the
    doubled CFG batch on 10x10 latents (25 tokens: padded shards on 2 and 4 ranks)."""
    torch.manual_seed(0)
    model = DiT(input_size=10, hidden_size=48)
    latents = torch.randn(1, 4, 10, 10).repeat(2, 1, 1, 1)  # the same latents, unconditional and conditional
    return model, {"x": latents, "t": torch.tensor([50, 50]), "y": torch.tensor([model.num_classes, 3])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--ulysses", type=int, default=2)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--size", type=int, default=8, help="latent side; (size/2)**2 tokens")
    args = parser.parse_args()

    def seeded_module() -> DiffusionSampler:
        torch.manual_seed(0)
        return make_module(DiT(input_size=args.size))

    strategy = SequenceParallelStrategy(ulysses_degree=args.ulysses, ring_degree=args.ring)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, logger=False)
    samples = torch.cat(trainer.predict(seeded_module(), requests(4)))
    if trainer.global_rank == 0:
        single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        reference = torch.cat(single.predict(seeded_module(), requests(4)))
        error = ((samples - reference).abs().max() / reference.abs().max()).item()
        print(
            f"{tuple(samples.shape)} samples on {args.devices} processes; max relative error vs 1 process: {error:.1e}"
        )


if __name__ == "__main__":
    main()
