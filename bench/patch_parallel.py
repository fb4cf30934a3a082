"""Patch methods: DistriFusion and PipeFusion x Ulysses latency and bytes per step; PipeFusion's text modes.

A rank stands for a device: every process runs with the same number of threads (default 1). Inside one launch,
alternating, rank 0 times the plain model alone (the one-process figure; the other ranks wait at a barrier) and
then all ranks time the parallel copy of the same seeded model. Reported: medians after a warm-up, their ratio, the
spread, and the bytes each rank sent per step (``CommCounter``) next to the DESIGN.md table.

* ``distrifusion``: DiT, one image, N ranks. The exact step (warm-up: keys and values gathered before attention)
  and the stale step (the previous step's, gathered while the step computes) are timed separately: their ratio
  shows how much of the all-gather the overlap hides. Table: ``2 p*hs`` per layer, asynchronous.
* ``pipefusion_ulysses``: DiT, one image, 2 stages x Ulysses 2 (4 ranks), one patched step. Table: Ulysses
  ``(4/N) p*hs`` per layer (all-to-all) and PipeFusion ``2 p*hs`` per step (stage boundary).
* ``text``: a Flux-shaped DiT (seeded random weights), 2 stages: one patched step with ``text_tokens="every_patch"``
  and with ``"per_step"``, and the deviation of whole samples (flow-matching Euler, warm-up 1) from exact sampling.

    python bench/patch_parallel.py                           # everything, defaults below
    python bench/patch_parallel.py --parts distrifusion --degree 2 --reps 5
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch
import torch.distributed as dist
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

from lightning_dit_parallel.app.sampling import DiffusionSampler
from lightning_dit_parallel.app.sampling.joint_conditioning import FluxConditioning
from lightning_dit_parallel.parallel.distrifusion import DistriFusionOptions, apply_distrifusion
from lightning_dit_parallel.parallel.layout import ParallelLayout
from lightning_dit_parallel.parallel.pipeline import PipelineOptions, apply_pipeline
from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups
from lightning_dit_parallel.registry import plan_for
from lightning_dit_parallel.testing.comm_counter import CommCounter
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.multiprocess import run_on_ranks
from lightning_dit_parallel.utils.sharpen import sharpen_attention

PARTS = ("distrifusion", "pipefusion_ulysses", "text")


def build_dit(tokens: int, hidden: int, heads: int, layers: int) -> DiTTransformer2DModel:
    side = int(round(tokens**0.5))
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=2 * side,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    ).eval()


def dit_inputs(tokens: int):
    side = int(round(tokens**0.5))
    x = torch.randn(1, 4, 2 * side, 2 * side, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    return {"hidden_states": x, "timestep": torch.tensor([10]), "class_labels": torch.tensor([3]), "return_dict": False}


def build_flux(hidden: int, heads: int, double: int, single: int, sharpen: float) -> FluxTransformer2DModel:
    """Seeded random weights; zero-initialised layers get small values, attention is sharpened by ``sharpen``
    (logits times its square: peaked, as in a trained model, so that stale keys matter)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=hidden // heads,
        num_attention_heads=heads,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=(hidden // heads // 4, 3 * hidden // heads // 8, 3 * hidden // heads // 8),
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # Flux zero-initialises its modulation and output layers: give them small values
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return sharpen_attention(model, sharpen)


def _median_ratio(plain: list, parallel: list) -> tuple[float, float, str]:
    p, q = statistics.median(w for w, _ in plain), statistics.median(w for w, _ in parallel)
    return p, q, f"{min(w for w, _ in parallel):.3f}-{max(w for w, _ in parallel):.3f}"


# -- DistriFusion ------------------------------------------------------------------------------------------------


def _distrifusion_worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    plain, patched = (build_dit(args.tokens, args.hidden, args.heads, args.layers) for _ in range(2))
    mesh = ParallelLayout(ring=world).resolve(world).build_mesh("cpu")
    installed = apply_distrifusion(patched, plan_for(patched), SequenceGroups.from_mesh(mesh), DistriFusionOptions(1))
    inputs = dit_inputs(args.tokens)

    def forward(model):
        with torch.no_grad():
            return model(**inputs)[0]

    def exact_step():
        installed.begin_batch()  # the next call is the first of a batch: warm-up, exact
        return forward(patched)

    reference = forward(plain)
    error = ((exact_step() - reference).abs().max() / reference.abs().max()).item()
    forward(patched)  # the first stale step (its gathers were started by the exact one)
    with CommCounter() as counter:
        forward(patched)  # one stale step
    plain_s, exact_s, stale_s = [], [], []
    for _ in range(args.reps):
        plain_s.append(time_rank_zero(lambda: forward(plain)))
        exact_s.append(time_all_ranks(exact_step))
        forward(patched)  # stale from here on
        stale_s.append(time_all_ranks(lambda: forward(patched)))
    return {
        "plain": plain_s,
        "exact": exact_s,
        "stale": stale_s,
        "bytes": dict(counter.bytes_sent),
        "error": error,
        "load": os.getloadavg()[0],
    }


def report_distrifusion(args: argparse.Namespace) -> None:
    n = args.degree
    print(
        f"\nDistriFusion: DiT {args.layers} blocks, hidden {args.hidden}, one image of {args.tokens} tokens,"
        f" {n} patches"
    )
    r = run_on_ranks(n, _distrifusion_worker, args, threads=args.threads, timeout_s=1800)[0]
    plain, exact, spread = _median_ratio(r["plain"], r["exact"])
    _, stale, stale_spread = _median_ratio(r["plain"], r["stale"])
    print(
        f"  one process {plain:.3f} s; exact step (warm-up) {exact:.3f} s ({spread}): {plain / exact:.2f}x;"
        f" stale step {stale:.3f} s ({stale_spread}): {plain / stale:.2f}x; stale vs exact {exact / stale:.2f}x"
    )
    print(
        f"  warm-up step vs one process: rel. max diff {r['error']:.1e}; load average {r['load']:.1f} on"
        f" {os.cpu_count()} cores"
    )
    p_hs = args.tokens * args.hidden * 4  # float32
    table = 2 * p_hs * args.layers
    sent = r["bytes"].get("all_gather", 0)
    kv_sent = 2 * p_hs / n * (n - 1) * args.layers
    print(
        f"  bytes per stale step, rank 0: all_gather {sent / 2**20:.3f} MiB sent: the keys and values of its patch to"
        f" {n - 1} peer(s), 2 (N-1)/N p*hs per layer = {kv_sent / 2**20:.3f} MiB (as much received), plus the output"
        f" gather; DESIGN.md table: 2 p*hs per layer x {args.layers} layers = {table / 2**20:.3f} MiB (all keys and"
        " values of the step, of which each rank holds 1/N already)"
    )


# -- PipeFusion x Ulysses ----------------------------------------------------------------------------------------


def _pipefusion_ulysses_worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    plain, piped = (build_dit(args.tokens, args.hidden, args.heads, args.layers) for _ in range(2))
    mesh = ParallelLayout(pp=2, ulysses=world // 2).resolve(world).build_mesh("cpu")
    options = PipelineOptions("pipefusion", num_patches=args.patches, warmup_steps=1)
    apply_pipeline(piped, plan_for(piped), options, mesh.get_group("pp"), SequenceGroups.from_mesh(mesh))
    inputs = dit_inputs(args.tokens)

    def forward(model):
        with torch.no_grad():
            return model(**inputs)[0]

    reference = forward(plain)
    error = ((forward(piped) - reference).abs().max() / reference.abs().max()).item()  # the unpatched warm-up step
    with CommCounter(count_isend=True) as counter:
        forward(piped)  # one patched step
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


def report_pipefusion_ulysses(args: argparse.Namespace) -> None:
    world = 4
    print(
        f"\nPipeFusion 2 stages x Ulysses 2 ({world} ranks): DiT {args.layers} blocks, hidden {args.hidden}, one"
        f" image of {args.tokens} tokens, {args.patches} patches, one patched step"
    )
    results = run_on_ranks(world, _pipefusion_ulysses_worker, args, threads=args.threads, timeout_s=1800)
    r = results[0]
    plain, piped, spread = _median_ratio(r["plain"], r["piped"])
    print(
        f"  one process {plain:.3f} s, {world} ranks {piped:.3f} s ({spread}): {plain / piped:.2f}x; warm-up step"
        f" rel. max diff {r['error']:.1e}; load average {r['load']:.1f} on {os.cpu_count()} cores"
    )
    p_hs = args.tokens * args.hidden * 4
    u, layers_per_stage = 2, args.layers // 2
    for rank, res in enumerate(results):
        measured = ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in sorted(res["bytes"].items()))
        print(f"  rank {rank} (stage {rank // u}): {measured}")
    a2a = 4 / u * p_hs * (u - 1) / u * layers_per_stage
    print(
        f"  DESIGN.md table per rank: Ulysses (4/N) p*hs per layer x {layers_per_stage} layers of the stage, times"
        f" (U-1)/U that leaves the rank: {a2a / 2**20:.3f} MiB all_to_all; PipeFusion 2 p*hs per step: stage 0's"
        f" {u} ranks send p*hs/U each of the hidden states, {p_hs / u / 2**20:.3f} MiB p2p"
    )


# -- PipeFusion's text tokens -----------------------------------------------------------------------------------


def flux_sampler(args: argparse.Namespace, steps: int) -> DiffusionSampler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    side = int(round(args.flux_tokens**0.5))
    return DiffusionSampler(
        build_flux(args.hidden, args.heads, 2, 4, args.sharpen),
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        FluxConditioning(side, side),
        latent_shape=(side * side, 16),
        num_inference_steps=steps,
        guidance_scale=4.0,
    )


def text_batch(args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(7)
    return {
        "index": torch.tensor([0]),
        "prompt_embeds": torch.randn(1, args.text_tokens, 64, generator=generator),
        "pooled_embeds": torch.randn(1, 32, generator=generator),
    }


def _text_worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    results: dict = {}
    batch = text_batch(args)
    for mode in ("every_patch", "per_step"):
        for steps in args.text_steps:
            sampler = flux_sampler(args, steps)
            options = PipelineOptions("pipefusion", num_patches=args.patches_text, warmup_steps=1, text_tokens=mode)
            installed = apply_pipeline(sampler.transformer, plan_for(sampler.transformer), options, dist.group.WORLD)
            installed.begin_batch()
            results[(mode, steps)] = sampler.sample(batch).numpy()
            installed.remove()
    # timing: one patched DiT call per mode, against the plain model
    plain = flux_sampler(args, 1).transformer
    side = int(round(args.flux_tokens**0.5))
    x = torch.randn(2, side * side, 16, generator=torch.Generator().manual_seed(2))
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    inputs = {
        "hidden_states": x,
        "encoder_hidden_states": torch.randn(2, args.text_tokens, 64),
        "pooled_projections": torch.randn(2, 32),
        "timestep": torch.tensor([0.5, 0.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(args.text_tokens, 3),
        "return_dict": False,
    }

    def forward(model):
        with torch.no_grad():
            return model(**inputs)[0]

    for mode in ("every_patch", "per_step"):
        model = flux_sampler(args, 1).transformer
        options = PipelineOptions("pipefusion", num_patches=args.patches_text, warmup_steps=1, text_tokens=mode)
        apply_pipeline(model, plan_for(model), options, dist.group.WORLD)
        forward(model)  # warm-up step
        plain_s, piped_s = [], []
        for _ in range(args.reps):
            plain_s.append(time_rank_zero(lambda: forward(plain)))
            piped_s.append(time_all_ranks(lambda: forward(model)))
        results[("time", mode)] = (plain_s, piped_s)
    return results


def report_text(args: argparse.Namespace) -> None:
    print(
        f"\nPipeFusion text modes: Flux-shaped DiT (hidden {args.hidden}, 2 double + 4 single blocks, seeded random"
        f" weights, attention sharpened x{args.sharpen:g}), {args.flux_tokens} image + {args.text_tokens} text tokens,"
        f" 2 stages, {args.patches_text} patches, warm-up 1, vs exact one-process sampling (latents)"
    )
    exact = {steps: flux_sampler(args, steps).sample(text_batch(args)) for steps in args.text_steps}
    r = run_on_ranks(2, _text_worker, args, threads=args.threads, timeout_s=3600)[0]
    m, s, t = args.patches_text, args.flux_tokens, args.text_tokens
    print(
        "| text_tokens | steps | max abs diff / max abs | mean abs diff / mean abs | PSNR dB (peak max abs)"
        " | tokens per step vs exact | patched step vs one process |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in ("every_patch", "per_step"):
        plain, piped, _ = _median_ratio(*r[("time", mode)])
        work = (s + (m * t if mode == "every_patch" else t)) / (s + t)
        for steps in args.text_steps:
            out, ref = torch.from_numpy(r[(mode, steps)]), exact[steps]
            diff, peak = (out - ref).abs(), ref.abs().max().item()
            mse = diff.pow(2).mean().item()
            psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
            mean = diff.mean().item() / ref.abs().mean().item()
            print(
                f"| {mode} | {steps} | {diff.max().item() / peak:.4f} | {mean:.5f} | {psnr:.1f} | {work:.2f} |"
                f" {plain / piped:.2f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8, help="blocks of the DiT")
    parser.add_argument("--tokens", type=int, default=4096, help="image tokens (a square), DiT runs")
    parser.add_argument("--degree", type=int, default=2, help="DistriFusion patches = ranks")
    parser.add_argument("--patches", type=int, default=8, help="PipeFusion x Ulysses patches")
    parser.add_argument("--flux-tokens", type=int, default=1024, help="image tokens (a square), text-mode runs")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--patches-text", type=int, default=4)
    parser.add_argument("--text-steps", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--sharpen", type=float, default=3.0, help="query/key scale of the Flux-shaped model")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks and the baseline)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s) per process, {args.reps} reps after warm-up, medians")
    if "distrifusion" in args.parts:
        report_distrifusion(args)
    if "pipefusion_ulysses" in args.parts:
        report_pipefusion_ulysses(args)
    if "text" in args.parts:
        report_text(args)


if __name__ == "__main__":
    main()
