"""A diffusers pipeline held as ``self.pipe`` in your own LightningModule, sampled in parallel by Trainer.predict.

    python examples/pipeline_pixart.py /models/PixArt-Sigma-XL-2-1024-MS --devices 2 --ulysses 2
    python examples/pipeline_pixart.py /models/PixArt-Sigma-XL-2-1024-MS --devices 4 --ulysses 2 --ring 2

Without weights, save a tiny random pipeline first (from a checkout, with the test extras installed):

    python -c "from tests.pipelines import pixart_sigma_pipeline as p; p().save_pretrained('/tmp/pixart')"
    python examples/pipeline_pixart.py /tmp/pixart --height 16 --width 16 --steps 2

``predict_step`` calls the pipeline as on one device; sample i uses ``torch.Generator("cpu").manual_seed(i)``, so
every layout gives the images plain diffusers gives. Only global rank 0 shows diffusers' progress bar.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from diffusers import PixArtSigmaPipeline
from torch.utils.data import DataLoader

from lightning_dit_parallel import SequenceParallelStrategy

PROMPTS = ["a red cat on the grass", "a blue dog under the sky", "a small green bird", "a big red dog"]


class PixArtSampler(L.LightningModule):
    def __init__(self, path: str, call: dict) -> None:
        super().__init__()
        self.pipe = PixArtSigmaPipeline.from_pretrained(path)  # not an nn.Module: the strategy attaches it
        self.call = call

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        return self.pipe(prompt=list(batch["prompt"]), generator=generators, output_type="pt", **self.call).images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", help="a PixArt-Sigma pipeline folder (save_pretrained layout)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--ulysses", type=int, default=2)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    call = dict(height=args.height, width=args.width, num_inference_steps=args.steps, use_resolution_binning=False)
    requests = DataLoader([{"index": torch.tensor(i), "prompt": p} for i, p in enumerate(PROMPTS)], batch_size=2)
    strategy = SequenceParallelStrategy(ulysses_degree=args.ulysses, ring_degree=args.ring)
    trainer = L.Trainer(accelerator="auto", devices=args.devices, strategy=strategy, logger=False)
    images = torch.cat(trainer.predict(PixArtSampler(args.path, call), requests))
    if trainer.is_global_zero:
        print(f"{strategy.layout.describe()}: images {tuple(images.shape)} in [{images.min():.2f}, {images.max():.2f}]")


if __name__ == "__main__":
    main()
