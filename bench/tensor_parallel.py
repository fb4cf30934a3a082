"""Tensor parallelism: parameters per rank, bytes per layer against DESIGN.md, and speedup against one process.

1. Parameters per rank for real model shapes, built on the meta device (no memory) and parallelized with
   tp = 2 and 4: DiT-XL/2 (the default layout, adaLN modulation split too), Flux.1-dev (diffusers' own
   ``_tp_plan``, which keeps the modulation whole) and Wan 2.1 14B (q/k norms over all heads sharded).
   Local shards counted, each parameter once, as a fraction of the whole model.
2. A DiT forward (one denoising step over the doubled CFG batch) on N ranks against one process with the same
   threads: the ranks are started once; alternating, rank 0 runs the plain model alone (the others wait at a
   barrier) and all ranks run the tensor-parallel copy of the same seeded model. Speedup and ceiling are medians
   of the ratios of adjacent measurements; the ceiling is what a perfect split would reach on this machine (N times
   the one-process time over the time of N processes each running the whole forward at once), the CPU-time ratio
   the work split (one process's CPU seconds / the busiest rank's), whatever the free cores. Bytes each rank sends
   per layer (DTensor's functional collectives, counted by ``FunctionalCommCounter``) next to the table in
   DESIGN.md: 4 p*hs per layer, the two all-reduces' bound for many ranks; a ring all-reduce of ``p*hs`` sends
   ``2 (N-1)/N p*hs`` from each rank. The per-sample collectives (adaLN modulation and embedders, ``B * k * hs``)
   are listed apart.

    python bench/tensor_parallel.py                        # parameters; tp 2 on 2 ranks
    python bench/tensor_parallel.py --ranks 2 4 --tokens 1024 --reps 5
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, WanTransformer3DModel

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.loading import build_on_meta
from lightning_dit_parallel.testing.comm_counter import CommCounter
from lightning_dit_parallel.testing.funcol_counter import FunctionalCommCounter
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.memory import local_tensor
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

MiB = 2**20

#: name -> (class, config) of real models, built on the meta device.
SHAPES = {
    "DiT-XL/2": (
        DiTTransformer2DModel,
        dict(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_num_groups=32,
        ),
    ),
    "Flux.1-dev": (FluxTransformer2DModel, dict(guidance_embeds=True)),
    "Wan2.1-14B": (
        WanTransformer3DModel,
        dict(
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        ),
    ),
}


def parameter_count(model: torch.nn.Module) -> int:
    """Elements this rank holds: the local shard of every DTensor, each parameter once (meta tensors count)."""
    return sum(local_tensor(p).numel() for p in {id(p): p for p in model.parameters()}.values())


def _params_worker(rank: int, world: int, name: str) -> float:
    cls, config = SHAPES[name]
    model = build_on_meta(lambda: cls(**config).eval())
    total = parameter_count(model)
    layout = ParallelLayout(tp=world).resolve(world)
    parallelize(model, layout, layout.build_mesh("cpu"), check_inputs=False)
    return parameter_count(model) / total


def build(tokens: int, hidden: int, heads: int, layers: int) -> DiTTransformer2DModel:
    side = round(tokens**0.5)
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


def _step_worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    plain = build(args.tokens, args.hidden, args.heads, args.layers)
    parallel = build(args.tokens, args.hidden, args.heads, args.layers)
    layout = ParallelLayout(tp=world).resolve(world)
    parallelize(parallel, layout, layout.build_mesh("cpu"))
    side = 2 * round(args.tokens**0.5)
    batch = 2 * args.batch  # the doubled CFG batch
    x = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 10)
    labels = torch.arange(batch) % 10

    def forward(model):
        with torch.no_grad():
            return model(x, timestep=t, class_labels=labels, return_dict=False)[0]

    reference = forward(plain)
    with FunctionalCommCounter() as funcol, CommCounter() as c10d:
        out = forward(parallel)  # also the warm-up
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    single, par, concurrent, single_cpu, par_cpu = [], [], [], [], []
    for _ in range(args.reps):
        wall, cpu = time_rank_zero(lambda: forward(plain))
        single.append(wall)
        single_cpu.append(cpu)
        wall, cpu = time_all_ranks(lambda: forward(parallel))
        par.append(wall)
        par_cpu.append(cpu)
        concurrent.append(time_all_ranks(lambda: forward(plain))[0])  # every rank runs the whole model at once
    return {
        "single": single,
        "parallel": par,
        "concurrent": concurrent,
        "single_cpu": single_cpu,
        "parallel_cpu": par_cpu,
        "error": error,
        "events": funcol.events,
        "guard": dict(c10d.bytes_sent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", nargs="+", type=int, default=[2], help="tp degrees of the timing table")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="samples (the DiT sees the doubled CFG batch)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks and the baseline)")
    parser.add_argument("--skip-params", action="store_true")
    args = parser.parse_args()

    if not args.skip_params:
        print("parameters per rank / whole model (meta device, local shards):")
        print(f"  {'model':12} {'tp=2':>6} {'tp=4':>6}")
        for name in SHAPES:
            shares = [run_on_ranks(n, _params_worker, name, timeout_s=600, reporting=[0])[0] for n in (2, 4)]
            print(f"  {name:12} {shares[0]:>6.3f} {shares[1]:>6.3f}")

    print(
        f"\nDiT forward over the doubled batch ({2 * args.batch} rows), {args.tokens} tokens, hidden {args.hidden},"
        f" {args.heads} heads, {args.layers} layers; {args.threads} thread(s) per process, {args.reps} reps after"
        " warm-up, one process and tp alternating"
    )
    print(
        f"{'tp':>3} {'1 proc s':>9} {'tp s':>8} {'speedup':>8} {'ceiling':>8} {'CPU-time ratio':>15}"
        f" {'spread s':>12} {'rel err':>8}"
    )
    rows = []
    for world in args.ranks:
        results = run_on_ranks(world, _step_worker, args, threads=args.threads, timeout_s=1800)
        r = results[0]
        speedup = statistics.median(s / p for s, p in zip(r["single"], r["parallel"]))
        ceiling = statistics.median(world * s / c for s, c in zip(r["single"], r["concurrent"]))
        cpu_ratio = statistics.median(r["single_cpu"]) / max(statistics.median(x["parallel_cpu"]) for x in results)
        print(
            f"{world:>3} {statistics.median(r['single']):>9.3f} {statistics.median(r['parallel']):>8.3f}"
            f" {speedup:>7.2f}x {ceiling:>7.2f}x {cpu_ratio:>14.2f}x"
            f" {min(r['parallel']):>5.3f}-{max(r['parallel']):<6.3f} {r['error']:>8.1e}"
        )
        rows.append((world, r))
    p_hs = 2 * args.batch * args.tokens * args.hidden * 4  # float32 bytes of the (B, p, hs) hidden states
    print(
        f"\nbytes per layer and rank (p*hs = {p_hs / MiB:.3f} MiB: {2 * args.batch} x {args.tokens} tokens x"
        f" {args.hidden} x 4 B):"
    )
    for world, r in rows:
        layers, ring = args.layers, 2 * (world - 1) / world
        tokens = [b for kind, b in r["events"] if kind == "all_reduce" and b == p_hs]  # (B, p, hs): attention, MLP
        other = [(kind, b) for kind, b in r["events"] if not (kind == "all_reduce" and b == p_hs)]
        other_sent = sum(b * ring if kind == "all_reduce" else b * (world - 1) for kind, b in other)
        print(
            f"  tp={world}: {len(tokens) / layers:.0f} all-reduces of p*hs per layer, sent"
            f" {len(tokens) * ring / layers:.2f} p*hs (ring all-reduce: 2 x 2(N-1)/N = {2 * ring:.2f} p*hs;"
            f" DESIGN.md table: 4 p*hs, the bound for many ranks); per-sample collectives (modulation, embedders)"
            f" {other_sent / layers / 1024:.1f} KiB per layer"
            f" ({other_sent / layers / p_hs:.4f} p*hs, {len(other)} calls per forward); input check"
            f" {sum(r['guard'].values()) / 1024:.1f} KiB per forward"
        )


if __name__ == "__main__":
    main()
