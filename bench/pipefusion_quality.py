"""PipeFusion quality on the embedded digits DiT: deviation from the exact output and classifier score.

For every number of patches M, warm-up steps W and denoising steps, the same requests are sampled with
PipeFusion on ``--stages`` ranks and exactly in one process (same seeded noise, deterministic DDIM).
Reported per configuration: max and mean absolute difference of the images (in [0, 1]) from the exact
ones, PSNR against them (peak 1), and the share of images the digits classifier assigns to the requested
class, for PipeFusion and for the exact run. Printed as a Markdown table.

    python bench/pipefusion_quality.py                                    # M 2 4 8, W 0 1 2, steps 10 25 50
    python bench/pipefusion_quality.py --patches 4 --warmup 1 --steps 25 --samples 20
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.distributed as dist

from lightning_dit_parallel.digits.data import DigitRequests
from lightning_dit_parallel.digits.model import digits_sampler
from lightning_dit_parallel.digits.quality import class_accuracy
from lightning_dit_parallel.pipeline import PipelineOptions, apply_pipeline
from lightning_dit_parallel.registry import plan_for
from lightning_dit_parallel.utils.multiprocess import run_on_ranks


def request_batch(samples: int) -> dict[str, torch.Tensor]:
    requests = DigitRequests(samples)
    items = [requests[i] for i in range(samples)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}  # (N,) each


def exact_images(steps: int, samples: int, weights: str | None) -> torch.Tensor:
    sampler = digits_sampler(num_inference_steps=steps, weights=weights)
    return sampler.sample(request_batch(samples))  # (N, 1, 16, 16) in [0, 1]


def _pipefusion_worker(rank: int, world: int, configs: list[tuple[int, int, int]], samples: int, weights: str | None) -> list:
    batch = request_batch(samples)
    results = []
    for patches, warmup, steps in configs:
        sampler = digits_sampler(num_inference_steps=steps, weights=weights)
        model = sampler.transformer
        pipeline = apply_pipeline(
            model, plan_for(model), PipelineOptions("pipefusion", num_patches=patches, warmup_steps=warmup), dist.group.WORLD
        )
        pipeline.begin_batch()  # what the strategy does at each predict_step
        start = time.perf_counter()
        images = sampler.sample(batch)
        results.append((images.numpy(), time.perf_counter() - start))
        pipeline.remove()
    return results


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (images - reference).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--samples", type=int, default=40, help="images per configuration (labels cycle 0..9)")
    parser.add_argument("--weights", default=None, help="folder with other trained digits weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = request_batch(args.samples)["class_label"]
    configs = list(itertools.product(args.patches, args.warmup, args.steps))
    guidance = digits_sampler(weights=args.weights).guidance_scale
    print(f"digits DiT (64 tokens, 4 blocks), PipeFusion on {args.stages} stages vs exact one-process sampling,"
          f" {args.samples} images, DDIM, guidance {guidance} (the default sampler)\n")
    exact = {steps: exact_images(steps, args.samples, args.weights) for steps in args.steps}
    ranks = run_on_ranks(args.stages, _pipefusion_worker, configs, args.samples, args.weights, timeout_s=3600)
    print("| patches M | warm-up W | steps | max abs diff | mean abs diff | PSNR dB | class acc. PipeFusion | class acc. exact |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (patches, warmup, steps) in enumerate(configs):
        images = torch.from_numpy(ranks[0][i][0])
        if any(not torch.equal(torch.from_numpy(r[i][0]), images) for r in ranks[1:]):
            raise AssertionError(f"ranks returned different images for M={patches} W={warmup} steps={steps}")
        diff = (images - exact[steps]).abs()
        print(f"| {patches} | {warmup} | {steps} | {diff.max().item():.4f} | {diff.mean().item():.5f} |"
              f" {psnr(images, exact[steps]):.1f} | {class_accuracy(images, labels):.3f} |"
              f" {class_accuracy(exact[steps], labels):.3f} |")


if __name__ == "__main__":
    main()
