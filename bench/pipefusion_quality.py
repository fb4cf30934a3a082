"""Quality of the patch methods on the embedded digits DiT: deviation from the exact output and classifier score.

Methods: PipeFusion on ``--stages`` ranks (``pipefusion``), PipeFusion on 2 stages x Ulysses 2 (``pipefusion_ulysses``,
4 ranks: each stage shards every patch over 2 ranks) and DistriFusion (``distrifusion``, one patch per rank). For every
number of patches M (PipeFusion) or patches = ranks N (DistriFusion), warm-up steps W and denoising steps, the same
requests are sampled with the method and exactly in one process (same seeded noise, deterministic DDIM). Reported per
configuration: max and mean absolute difference of the images (in [0, 1]) from the exact ones, PSNR against them
(peak 1), and the share of images the digits classifier assigns to the requested class, for the method and for the
exact run. Printed as a Markdown table.

    python bench/pipefusion_quality.py                                    # everything below
    python bench/pipefusion_quality.py --methods pipefusion --patches 4 --warmup 1 --steps 25 --samples 20
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.distributed as dist

from lightning_dit_parallel.app.digits.data import DigitRequests
from lightning_dit_parallel.app.digits.model import digits_sampler
from lightning_dit_parallel.app.digits.quality import class_accuracy
from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions, apply_distrifusion
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.pipeline import PipelineOptions, apply_pipeline
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.registry import plan_for
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

METHODS = ("pipefusion", "pipefusion_ulysses", "distrifusion")


def request_batch(samples: int) -> dict[str, torch.Tensor]:
    requests = DigitRequests(samples)
    items = [requests[i] for i in range(samples)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}  # (N,) each


def exact_images(steps: int, samples: int, weights: str | None) -> torch.Tensor:
    sampler = digits_sampler(num_inference_steps=steps, weights=weights)
    return sampler.sample(request_batch(samples))  # (N, 1, 16, 16) in [0, 1]


def _worker(
    rank: int, world: int, method: str, configs: list[tuple[int, int, int]], samples: int, weights: str | None
) -> list:
    batch = request_batch(samples)
    if method == "pipefusion":
        pp_group, groups = dist.group.WORLD, None
    else:
        degrees = dict(pp=2, ulysses=2) if method == "pipefusion_ulysses" else dict(ring=world)
        mesh = ParallelLayout(**degrees).resolve(world).build_mesh("cpu")
        pp_group, groups = mesh.get_group("pp"), SequenceGroups.from_mesh(mesh)
    results = []
    for patches, warmup, steps in configs:
        sampler = digits_sampler(num_inference_steps=steps, weights=weights)
        model = sampler.transformer
        if method == "distrifusion":
            installed = apply_distrifusion(model, plan_for(model), groups, DistriFusionOptions(warmup))
        else:
            options = PipelineOptions("pipefusion", num_patches=patches, warmup_steps=warmup)
            installed = apply_pipeline(model, plan_for(model), options, pp_group, groups)
        installed.begin_batch()  # what the strategy does at each predict_step
        start = time.perf_counter()
        images = sampler.sample(batch)
        results.append((images.numpy(), time.perf_counter() - start))
        installed.remove()
    return results


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (images - reference).pow(2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--patches", type=int, nargs="+", default=[2, 4, 8], help="PipeFusion patches M")
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 4], help="DistriFusion patches = ranks")
    parser.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--stages", type=int, default=2, help="PipeFusion stages (method pipefusion)")
    parser.add_argument("--samples", type=int, default=40, help="images per configuration (labels cycle 0..9)")
    parser.add_argument("--weights", default=None, help="folder with other trained digits weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = request_batch(args.samples)["class_label"]
    guidance = digits_sampler(weights=args.weights).guidance_scale
    print(
        f"digits DiT (64 tokens, 4 blocks) vs exact one-process sampling, {args.samples} images, DDIM, guidance"
        f" {guidance} (the default sampler); PipeFusion on {args.stages} stages, PipeFusion x Ulysses on 2 x 2 ranks,"
        " DistriFusion on N ranks\n"
    )
    exact = {steps: exact_images(steps, args.samples, args.weights) for steps in args.steps}
    rows = []
    for method in args.methods:
        sizes = args.degrees if method == "distrifusion" else args.patches
        if method == "distrifusion":  # at least one warm-up step: the first step has no stale keys to use
            warmups = [w for w in args.warmup if w >= 1]
            launches = [(n, [(n, w, s) for w, s in itertools.product(warmups, args.steps)]) for n in sizes]
        else:
            world = args.stages if method == "pipefusion" else 4
            launches = [(world, list(itertools.product(sizes, args.warmup, args.steps)))]
        for world, configs in launches:
            ranks = run_on_ranks(world, _worker, method, configs, args.samples, args.weights, timeout_s=3600)
            for i, (patches, warmup, steps) in enumerate(configs):
                images = torch.from_numpy(ranks[0][i][0])
                if any(not torch.equal(torch.from_numpy(r[i][0]), images) for r in ranks[1:]):
                    raise AssertionError(f"ranks returned different images for {method} {patches} W={warmup} {steps}")
                rows.append((method, patches, warmup, steps, images))
    print(
        "| method | patches M / ranks N | warm-up W | steps | max abs diff | mean abs diff | PSNR dB"
        " | class acc. method | class acc. exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, patches, warmup, steps, images in rows:
        diff = (images - exact[steps]).abs()
        print(
            f"| {method} | {patches} | {warmup} | {steps} | {diff.max().item():.4f} | {diff.mean().item():.5f} |"
            f" {psnr(images, exact[steps]):.1f} | {class_accuracy(images, labels):.3f} |"
            f" {class_accuracy(exact[steps], labels):.3f} |"
        )


if __name__ == "__main__":
    main()
