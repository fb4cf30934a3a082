"""Step caching: steps skipped, speedup against the uncached run and deviation from it, in one process and Ulysses 2.

The model is the embedded digits DiT (trained; 64 tokens, 4 blocks; ``lightning_dit_parallel.app.digits``), sampling
``--samples`` digits in one batch with ``--steps`` DDIM steps and CFG. For each cache method at its default threshold
(and the uncached run): steps skipped of the steps, median time of a whole sampling loop, speedup against the uncached
run of the same layout (medians of adjacent ratios, alternating, so that drift cancels), the deviation of the final
images from the uncached one-process images (relative L2 and PSNR, images in [0, 1]), the class accuracy of the
digits (the package's classifier; the uncached model's own figure is the reference), and the bytes of cached
residuals per rank. The speedup is also given in CPU seconds (the slowest rank's), which a loaded machine disturbs
less than wall time. A rank stands for a device: every process runs with ``--threads`` threads.

    python bench/cache.py                      # 25 steps, 20 samples, 5 repetitions
    python bench/cache.py --steps 30 --reps 3 --thresholds fbcache=0.12 teacache=0.3
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.app.digits.model import digits_sampler
from lightning_dit_parallel.app.digits.quality import class_accuracy
from lightning_dit_parallel.parallel.cache import DEFAULT_THRESHOLDS, apply_step_cache, cache_config
from lightning_dit_parallel.registry import find_planned_modules
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

VARIANTS = ("none", "fbcache", "teacache")


def _batch(samples: int) -> dict:
    index = torch.arange(samples)
    return {"index": index, "class_label": index % 10}


def _single(variant: str, thresholds: dict, steps: int):
    """A one-process sampler with the variant's cache; returns (module, run) where run() samples one batch."""
    module = digits_sampler(num_inference_steps=steps)
    cache = None
    if variant != "none":
        ((_, dit, plan),) = find_planned_modules(module)
        cache = apply_step_cache(dit, plan, cache_config(variant, thresholds[variant]), steps_source=module)

    def run(batch):
        if cache is not None:
            cache.begin_batch()
        return module.sample(batch), cache.stats if cache is not None else None

    return run


def _parallel(variant: str, thresholds: dict, steps: int, world: int):
    """The same under Ulysses over ``world`` ranks (parallelize with the cache; one decision per group)."""
    module = digits_sampler(num_inference_steps=steps)
    layout = ParallelLayout(ulysses=world).resolve(world)
    config = cache_config(variant, thresholds[variant]) if variant != "none" else None
    parallelized = parallelize(module, layout, layout.build_mesh("cpu"), cache=config)

    def run(batch):
        parallelized.begin_batch()
        stats = [item.stats for item in parallelized.applied if hasattr(item, "skipped_output")]
        out = module.sample(batch)
        return out, (stats[0] if stats else None)

    return run


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    batch = _batch(args.samples)
    singles = {v: _single(v, args.thresholds, args.steps) for v in VARIANTS}
    parallels = {v: _parallel(v, args.thresholds, args.steps, world) for v in VARIANTS}
    results: dict = {}
    for layout, runs, timer in (
        ("one process", singles, time_rank_zero),
        (f"ulysses {world}", parallels, time_all_ranks),
    ):
        for variant, run in runs.items():
            box: list = []
            timer(lambda run=run, box=box: box.append(run(batch)))  # warm-up, and the outputs
            if box:
                out, stats = box[0]
                results[(layout, variant)] = dict(
                    out=out.tolist(),  # a list: a tensor would pass between processes through shared memory
                    skipped=stats.skipped_steps if stats else 0,
                    steps=stats.steps if stats else args.steps,
                    bytes=stats.cached_bytes if stats else 0,
                    times=[],
                    cpu=[],
                )
    for _ in range(args.reps):  # alternating, so that drift between repetitions cancels in the ratios
        for layout, runs, timer in (
            ("one process", singles, time_rank_zero),
            (f"ulysses {world}", parallels, time_all_ranks),
        ):
            for variant, run in runs.items():
                seconds, cpu = timer(lambda run=run: run(batch))
                if (layout, variant) in results:
                    results[(layout, variant)]["times"].append(seconds)
                    results[(layout, variant)]["cpu"].append(cpu)
    return results


def _psnr(out: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((out - reference) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--world", type=int, default=2, help="Ulysses degree (heads 4: 2 or 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--thresholds", nargs="*", default=[], help="method=value, default: the methods' defaults")
    args = parser.parse_args()
    args.thresholds = {**DEFAULT_THRESHOLDS, **{k: float(v) for k, v in (t.split("=") for t in args.thresholds)}}
    results = run_on_ranks(args.world, _worker, args, threads=args.threads, timeout_s=1800)
    for result in results:
        for row in result.values():
            row["out"] = torch.tensor(row["out"])
    merged = results[0]  # rank 0 holds every figure (the one-process runs ran there)
    reference = merged[("one process", "none")]["out"]
    labels = _batch(args.samples)["class_label"]
    print(
        f"digits DiT, {args.samples} samples, {args.steps} DDIM steps, CFG 2.0, {args.threads} thread(s) per rank;"
        f" thresholds {args.thresholds}; {args.reps} repetitions"
    )
    print(
        "| layout | cache | steps skipped | time (s, median) | speedup vs uncached | speedup, CPU time | rel. L2 vs"
        " uncached | PSNR (dB) | class accuracy | cached residuals per rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (layout, variant), r in merged.items():
        base = merged[(layout, "none")]
        ratios = [b / t for b, t in zip(base["times"], r["times"])]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if variant != "none" else ""
        cpu = [b / t for b, t in zip(base["cpu"], r["cpu"])]  # CPU seconds: less sensitive to a loaded machine
        rel = float((r["out"] - reference).norm() / reference.norm())
        print(
            f"| {layout} | {variant} | {r['skipped']}/{r['steps']} | {statistics.median(r['times']):.3f} |"
            f" {statistics.median(ratios):.2f}{spread} | {statistics.median(cpu):.2f} | {rel:.2e} |"
            f" {_psnr(r['out'], reference):.1f} |"
            f" {class_accuracy(r['out'], labels):.2f} | {r['bytes'] / 1024:.1f} KiB |"
        )
    outs = [
        res[(f"ulysses {args.world}", v)]["out"]
        for res in results
        for v in VARIANTS
        if (f"ulysses {args.world}", v) in res
    ]
    print(
        f"every rank's Ulysses output identical: {all(torch.equal(a, b) for a, b in zip(outs, outs[len(VARIANTS) :]))}"
    )


if __name__ == "__main__":
    main()
