"""Sequence-parallel DiT forward: speedup against one process and bytes sent per rank.

A rank stands for a device: every process runs with the same number of threads (default 1). The ranks are
started once; inside them, alternating, rank 0 times the plain model alone (the one-process figure, the
other ranks wait at a barrier) and then all ranks time the parallelized copy of the same seeded model.
Reported: median time of each, their ratio, the spread, and the bytes each rank sent during one parallel
forward next to the figure the table in DESIGN.md predicts. Speedup and ceiling are medians of the ratios of
adjacent measurements (one repetition each), so that the machine's drift between repetitions cancels. The "ceiling"
column is the speedup a perfect split would reach on this machine: N times the one-process time over the time of N
processes each running the whole forward at once (shared caches, memory bandwidth and neighbours slow concurrent
processes down).

    python bench/sequence_parallel.py                      # ulysses and ring on 2 ranks, usp on 4
    python bench/sequence_parallel.py --methods ring --tokens 1024 --reps 3
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusers import DiTTransformer2DModel

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.testing.comm_counter import CommCounter
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

METHODS = {"ulysses": (2, 1), "ring": (1, 2), "usp": (2, 2)}  # (ulysses, ring)


def build(tokens: int, hidden: int, heads: int, layers: int) -> DiTTransformer2DModel:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"--tokens must be a square number (patch grid side**2), got {tokens}.")
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        sample_size=2 * side,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    ).eval()


def expected_bytes(
    method: str, ulysses: int, ring: int, tokens: int, hidden: int, layers: int, batch: int
) -> dict[str, float]:
    """Per rank per forward, from the DESIGN.md table (p tokens, hs hidden, float32), plus the output gather."""
    p_hs = tokens * hidden * 4 * batch
    n = ulysses * ring
    figures = {}
    if ulysses > 1:  # q, k, v and out, each (U-1)/U of the local (p/N x hs) tensor: ~ (4/N) p*hs for U = N
        figures["all_to_all"] = layers * 4 * (ulysses - 1) / ulysses * p_hs / n
    if ring > 1:  # steps of k and v blocks of (p*U/N x hs/U): ~ 2 p*hs
        figures["p2p"] = layers * 2 * (ring - 1) * p_hs / n
    return figures


def _worker(rank: int, world: int, args: argparse.Namespace, method: str) -> dict:
    ulysses, ring = METHODS[method]
    plain = build(args.tokens, args.hidden, args.heads, args.layers)
    parallel = build(args.tokens, args.hidden, args.heads, args.layers)
    layout = ParallelLayout(ulysses=ulysses, ring=ring).resolve(world)
    parallelize(parallel, layout, layout.build_mesh("cpu"))
    side = int(round(args.tokens**0.5))
    x = torch.randn(args.batch, 4, 2 * side, 2 * side, generator=torch.Generator().manual_seed(1))
    t = torch.full((args.batch,), 10)
    labels = torch.arange(args.batch) % 10

    def forward(model):
        with torch.no_grad():
            return model(x, timestep=t, class_labels=labels, return_dict=False)[0]

    reference = forward(plain)
    with CommCounter() as counter:
        out = forward(parallel)
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    single, par, concurrent = [], [], []
    for _ in range(args.reps):
        single.append(time_rank_zero(lambda: forward(plain))[0])
        par.append(time_all_ranks(lambda: forward(parallel))[0])
        concurrent.append(time_all_ranks(lambda: forward(plain))[0])  # every rank runs the whole model at once
    return {
        "single": single,
        "parallel": par,
        "concurrent": concurrent,
        "bytes": dict(counter.bytes_sent),
        "error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks and the baseline)")
    args = parser.parse_args()
    print(
        f"DiT forward, {args.tokens} tokens, hidden {args.hidden}, {args.heads} heads, {args.layers} layers,"
        f" batch {args.batch}, {args.threads} thread(s) per process, {args.reps} reps after warm-up"
    )
    header = (
        f"{'method':8} {'ranks':>5} {'1 proc s':>9} {'N ranks s':>10} {'speedup':>8} {'ceiling':>8} {'spread':>14}"
        f" {'rel err':>8}"
    )
    print(header)
    rows = []
    for method in args.methods:
        ulysses, ring = METHODS[method]
        world = ulysses * ring
        results = run_on_ranks(world, _worker, args, method, threads=args.threads, timeout_s=1200)
        single = statistics.median(results[0]["single"])
        par = statistics.median(results[0]["parallel"])
        r = results[0]
        # ratios of adjacent measurements: the machine's drift between repetitions cancels
        speedup = statistics.median(s / p for s, p in zip(r["single"], r["parallel"]))
        ceiling = statistics.median(world * s / c for s, c in zip(r["single"], r["concurrent"]))
        spread = f"{min(results[0]['parallel']):.3f}-{max(results[0]['parallel']):.3f}"
        print(
            f"{method:8} {world:>5} {single:>9.3f} {par:>10.3f} {speedup:>7.2f}x {ceiling:>7.2f}x {spread:>14}"
            f" {results[0]['error']:>8.1e}"
        )
        rows.append((method, world, results))
    print("\nbytes sent per rank per forward (measured on rank 0 / expected from DESIGN.md):")
    for method, world, results in rows:
        ulysses, ring = METHODS[method]
        expected = expected_bytes(method, ulysses, ring, args.tokens, args.hidden, args.layers, args.batch)
        measured = results[0]["bytes"]
        for kind in sorted(set(expected) | set(measured)):
            exp = expected.get(kind)
            exp_text = f"{exp / 2**20:8.2f} MiB" if exp else "   (output gather, not in the table)"
            print(f"  {method:8} {kind:10} {measured.get(kind, 0) / 2**20:8.2f} MiB / {exp_text}")


if __name__ == "__main__":
    main()
