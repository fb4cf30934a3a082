r"""Sequence-parallel sampling from a (small, randomly initialised) PixArt transformer with Trainer.predict.

    python examples/sequence_parallel_pixart.py --devices 2 --ulysses 2
    python examples/sequence_parallel_pixart.py --devices 4 --ulysses 2 --ring 2
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST --master-port 29500 \
        examples/sequence_parallel_pixart.py --accelerator gpu --num-nodes 2 --devices 8 --ulysses 4 --ring 4

Lightning's default launcher re-runs this script for the other ranks (torchrun and srun start them instead);
every rank computes the same full images, and the script checks them against a one-process run of the same
seeded model.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from diffusers import DDIMScheduler, PixArtTransformer2DModel
from torch.utils.data import DataLoader

from lightning_dit_parallel import SequenceParallelStrategy
from lightning_dit_parallel.app.sampling import DiffusionSampler, TextConditioning


def make_module(sample_size: int) -> DiffusionSampler:
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=sample_size,
        patch_size=2,
        cross_attention_dim=64,
        caption_channels=32,
        norm_num_groups=4,
    )
    return DiffusionSampler(
        transformer,
        DDIMScheduler(num_train_timesteps=100),
        TextConditioning(out_channels=4),
        latent_shape=(4, sample_size, sample_size),
        num_inference_steps=4,
        guidance_scale=4.0,
    )


def requests(n: int) -> DataLoader:
    embeds = torch.randn(n, 8, 32, generator=torch.Generator().manual_seed(1))  # stand-in for text-encoder output
    return DataLoader([{"index": torch.tensor(i), "prompt_embeds": embeds[i]} for i in range(n)], batch_size=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2, help="processes per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=2)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--size", type=int, default=16, help="latent side; (size/2)**2 tokens")
    args = parser.parse_args()

    strategy = SequenceParallelStrategy(ulysses_degree=args.ulysses, ring_degree=args.ring)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, logger=False
    )
    images = torch.cat(trainer.predict(make_module(args.size), requests(4))).cpu()
    if trainer.is_global_zero:
        single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        reference = torch.cat(single.predict(make_module(args.size), requests(4)))
        error = ((images - reference).abs().max() / reference.abs().max()).item()
        ranks_per_node = args.devices if args.num_nodes > 1 else None
        print(
            f"{strategy.layout.describe(ranks_per_node)}: {tuple(images.shape)} images,"
            f" max relative error vs one process {error:.1e}"
        )


if __name__ == "__main__":
    main()
