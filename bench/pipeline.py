"""Pipeline parallelism: parameters per rank, micro-batch throughput, PipeFusion latency, bytes per step.

A rank stands for a device: every process runs with the same number of threads (default 1). The ranks are
started once per measurement; inside them, alternating, rank 0 times the plain model alone (the
one-process figure; the other ranks wait at a barrier) and then all ranks time the pipelined copy of the
same seeded model. Reported: medians after one warm-up, their ratio, the spread, and the bytes each rank
sent (counted by ``CommCounter``, which wraps ``dist.isend``, ``dist.broadcast`` and the other calls)
next to the DESIGN.md table.

    python bench/pipeline.py                     # everything, defaults below
    python bench/pipeline.py --parts params microbatch --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
from diffusers import DiTTransformer2DModel

from lightning_dit_parallel.parallel.pipeline import PipelineOptions, apply_pipeline
from lightning_dit_parallel.parallel.pipeline.stages import count_parameters
from lightning_dit_parallel.registry import plan_for
from lightning_dit_parallel.testing.comm_counter import CommCounter
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

PARTS = ("params", "microbatch", "pipefusion")


def build(
    tokens: int, hidden: int, heads: int, layers: int, classes: int = 10, device: str = "cpu"
) -> DiTTransformer2DModel:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"tokens must be a square number (patch grid side**2), got {tokens}.")
    torch.manual_seed(0)
    with torch.device(device):
        return DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=hidden // heads,
            in_channels=4,
            out_channels=8,
            num_layers=layers,
            sample_size=2 * side,
            patch_size=2,
            num_embeds_ada_norm=classes,
            norm_num_groups=4,
        ).eval()


def inputs(tokens: int, batch: int):
    side = int(round(tokens**0.5))
    x = torch.randn(batch, 4, 2 * side, 2 * side, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    return x, torch.full((batch,), 10), torch.arange(batch) % 10


# -- parameters per rank ---------------------------------------------------------------------------------


def _params_worker(rank: int, world: int, layers: int) -> dict:
    """DiT-XL/2 shapes (hidden 1152, 16 heads, 1000 classes, 256 x 256 images) on the meta device: counts only."""
    model = build(256, 1152, 16, layers, classes=1000, device="meta")
    total = count_parameters(model)
    apply_pipeline(model, plan_for(model), PipelineOptions(), dist.group.WORLD)
    return {"total": total, "held": count_parameters(model)}


# -- timing ----------------------------------------------------------------------------------------------


def _timing_worker(rank: int, world: int, args: argparse.Namespace, mode: str) -> dict:
    tokens = args.tokens if mode == "microbatch" else args.fusion_tokens
    batch = args.batch if mode == "microbatch" else 1
    plain = build(tokens, args.hidden, args.heads, args.layers)
    piped = build(tokens, args.hidden, args.heads, args.layers)
    options = (
        PipelineOptions("microbatch", num_microbatches=args.microbatches)
        if mode == "microbatch"
        else PipelineOptions("pipefusion", num_patches=args.patches, warmup_steps=1)
    )
    apply_pipeline(piped, plan_for(piped), options, dist.group.WORLD)
    x, t, labels = inputs(tokens, batch)

    def forward(model):
        with torch.no_grad():
            return model(x, timestep=t, class_labels=labels, return_dict=False)[0]

    reference = forward(plain)
    out = forward(piped)  # warm-up; for PipeFusion the unpatched warm-up step that fills the caches
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    with CommCounter(count_isend=True) as counter:
        out = forward(piped)  # one (patched, for PipeFusion) step
    plain_s, piped_s = [], []
    for _ in range(args.reps):
        plain_s.append(time_rank_zero(lambda: forward(plain)))
        piped_s.append(time_all_ranks(lambda: forward(piped)))
    return {
        "plain": plain_s,
        "piped": piped_s,
        "bytes": dict(counter.bytes_sent),
        "error": error,
        "load": os.getloadavg()[0],
    }


def _report_timing(name: str, world: int, results: list[dict], unit: str, per: float) -> None:
    """Wall-clock medians and their ratio; also CPU-time medians (the busiest rank), whose ratio is what the wall
    ratio would be if every process had a core of its own, but which does not see pipeline bubbles."""
    r = results[0]
    plain, piped = (statistics.median(w for w, _ in r[k]) for k in ("plain", "piped"))
    plain_cpu, piped_cpu = (statistics.median(c for _, c in r[k]) for k in ("plain", "piped"))
    spread = f"{min(w for w, _ in r['piped']):.3f}-{max(w for w, _ in r['piped']):.3f}"
    print(
        f"  {name}: one process {plain:.3f} s, {world} ranks {piped:.3f} s (spread {spread}):"
        f" wall ratio {plain / piped:.2f}x ({per / piped:.2f} {unit}/s); rel. max diff {r['error']:.1e}"
    )
    print(
        f"  {' ' * len(name)}  CPU time: one process {plain_cpu:.3f} s, busiest rank {piped_cpu:.3f} s:"
        f" ratio {plain_cpu / piped_cpu:.2f}x; load average at the end {r['load']:.1f} on {os.cpu_count()} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8, help="blocks of the timed DiTs")
    parser.add_argument(
        "--tokens",
        type=int,
        default=1024,
        help="image tokens per sample (1024: a 512 px DiT-XL/2 image), micro-batch run",
    )
    parser.add_argument("--batch", type=int, default=8, help="samples per DiT call, micro-batch run")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--fusion-tokens", type=int, default=4096, help="image tokens, PipeFusion run (one image)")
    parser.add_argument("--patches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks and the baseline)")
    args = parser.parse_args()
    n = args.stages
    print(f"{n} pipeline stages, {args.threads} thread(s) per process, {args.reps} reps after warm-up, medians")

    if "params" in args.parts:
        print("\nparameters per rank, DiT-XL/2 shapes (28 blocks, hidden 1152), counted on the meta device:")
        for world in sorted({2, 4, n}):
            results = run_on_ranks(world, _params_worker, 28, timeout_s=600)
            fractions = " ".join(f"{r['held'] / r['total']:.3f}" for r in results)
            print(
                f"  {world} stages: {results[0]['total'] / 1e6:.1f} M parameters; fraction held per rank: {fractions}"
                f" (ideal 1/{world} = {1 / world:.3f} plus embeddings, final layer and block 0's embedding)"
            )

    rows = []
    if "microbatch" in args.parts:
        print(
            f"\nmicro-batch pipeline: DiT {args.layers} blocks, hidden {args.hidden}, {args.tokens} tokens, batch"
            f" {args.batch} in {args.microbatches} micro-batches:"
        )
        results = run_on_ranks(n, _timing_worker, args, "microbatch", threads=args.threads, timeout_s=1800)
        _report_timing("throughput, one DiT call", n, results, "samples", args.batch)
        p_hs = args.tokens * args.hidden * 4 * args.batch / args.microbatches
        rows.append(
            (
                "microbatch",
                results,
                {"p2p": (n - 1) * args.microbatches * 2 * p_hs},
                "2 p*hs per micro-batch per boundary",
            )
        )
    if "pipefusion" in args.parts:
        print(
            f"\nPipeFusion: DiT {args.layers} blocks, hidden {args.hidden}, one image of {args.fusion_tokens} tokens,"
            f" {args.patches} patches, one patched step:"
        )
        results = run_on_ranks(n, _timing_worker, args, "pipefusion", threads=args.threads, timeout_s=1800)
        _report_timing("latency, one denoising step", n, results, "steps", 1)
        p_hs = args.fusion_tokens * args.hidden * 4
        rows.append(("pipefusion", results, {"p2p": 2 * p_hs}, "2 p*hs per step"))
    if rows:
        print(
            "\nbytes sent per DiT call, each rank (p2p = stage-to-stage, broadcast = the output from the last stage):"
        )
        for name, results, expected, rule in rows:
            for rank, r in enumerate(results):
                measured = ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in sorted(r["bytes"].items())) or "nothing"
                print(f"  {name:10} rank {rank}: {measured}")
            total = sum(r["bytes"].get("p2p", 0) for r in results)
            print(
                f"  {name:10} all ranks p2p {total / 2**20:.3f} MiB; DESIGN.md table ({rule}, float32):"
                f" {expected['p2p'] / 2**20:.3f} MiB"
            )


if __name__ == "__main__":
    main()
