"""CFG parallel over separate DiT calls: DiT time per denoising step, 2 ranks (cfg=2) against one process.

A denoising step as diffusers' ``WanPipeline`` makes it: a conditional and an unconditional call of a Wan
transformer on the same latents and timestep (batch of 1 prompt), then the guidance combination and an Euler update.
The two ranks are started once; alternating, rank 0 runs the plain model alone (the other waits at a barrier) and
both ranks run the cfg-parallel copy of the same seeded model (each computes one call, then the outputs are
exchanged). The first step of the loop is the one the call pattern is learned from (both calls on both ranks) and
is timed apart; every later step is timed on its own. Each process has the same number of threads. Printed: the
median step times, their spread, the ratio parallel / one process (target <= 0.6), the CPU seconds of the busiest
rank over those of one process (the work split, which a machine short of free cores does not blur), the relative
error of the latents after every step, and the bytes each rank sent per step against DESIGN.md's "one all-gather of
the output". On a loaded machine the medians drift; the ratio of the fastest steps (each side's best) is printed
too, and the machine's own ceiling: both ranks running one plain call at the same time, over one process's step
(0.5 when two cores are free; more when other work holds them).

    python bench/cfg_separate.py
    python bench/cfg_separate.py --frames 3 --side 32 --hidden 256 --layers 4 --reps 6   # a smaller, faster run
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusers import WanTransformer3DModel

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.parallel.guidance import CFGParallel
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

CHANNELS, TEXT_DIM, TEXT_TOKENS = 16, 64, 32


def build(args: argparse.Namespace) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=args.hidden // 32,
        attention_head_dim=32,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=4 * args.hidden,
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    ).eval()


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    plain, parallel = build(args), build(args)
    layout = ParallelLayout(cfg=2).resolve(world)
    handle = parallelize(parallel, layout, layout.build_mesh("cpu"))
    cfg = next(item for item in handle.applied if isinstance(item, CFGParallel))
    g = torch.Generator().manual_seed(1)
    start = torch.randn(1, CHANNELS, args.frames, args.side, args.side, generator=g)  # (B, C, F, H, W)
    cond = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    uncond = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
    latents = {"plain": start.clone(), "parallel": start.clone()}

    def step(name: str, model, t: float) -> None:
        x, timestep = latents[name], torch.tensor([t])
        with torch.no_grad():  # as WanPipeline: conditional call, unconditional call, then the combination
            noise = model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
            noise_uncond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
        latents[name] = x - 0.05 * (noise_uncond + 5.0 * (noise - noise_uncond))

    def half(t: float) -> None:  # one call of the plain model: what each rank computes per step, ideally
        with torch.no_grad():
            plain(hidden_states=start, timestep=torch.tensor([t]), encoder_hidden_states=cond, return_dict=False)

    def error() -> float:  # on rank 0, which also runs the one-process loop
        a, b = latents["parallel"], latents["plain"]
        return ((a - b).abs().max() / b.abs().max()).item()

    handle.begin_batch()
    timesteps = torch.linspace(999, 1, args.reps + 1).tolist()
    first_single = time_rank_zero(lambda: step("plain", plain, timesteps[0]))[0]
    first_parallel = time_all_ranks(lambda: step("parallel", parallel, timesteps[0]))[0]
    errors, single, par, sent, single_cpu, par_cpu, ceiling = [error()], [], [], [], [], [], []
    for t in timesteps[1:]:
        wall, cpu = time_rank_zero(lambda: step("plain", plain, t))
        single.append(wall)
        single_cpu.append(cpu)
        before = cfg.bytes_sent
        wall, cpu = time_all_ranks(lambda: step("parallel", parallel, t))  # the slowest rank's
        par.append(wall)
        par_cpu.append(cpu)
        sent.append(cfg.bytes_sent - before)
        ceiling.append(time_all_ranks(lambda: half(t))[0])  # both ranks one plain call at once: the machine's best
        errors.append(error())
    handle.end_batch()
    output_bytes = start.numel() * start.element_size()
    return {
        "first": (first_single, first_parallel),
        "single": single,
        "parallel": par,
        "errors": errors,
        "single_cpu": single_cpu,
        "parallel_cpu": par_cpu,
        "ceiling": ceiling,
        "latents": latents["parallel"].flatten().tolist(),  # plain values: tensors do not survive the queue
        "sent": sent,
        "output_bytes": output_bytes,
        "computed": cfg.computed_calls,
        "skipped": cfg.skipped_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3, help="latent frames")
    parser.add_argument("--side", type=int, default=48, help="latent height and width (patch 2 x 2)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (heads of 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=6, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks and the baseline)")
    args = parser.parse_args()
    tokens = args.frames * (args.side // 2) ** 2
    r0, r1 = run_on_ranks(2, _worker, args, threads=args.threads, timeout_s=1800)
    single, par = statistics.median(r0["single"]), statistics.median(r0["parallel"])
    ratios = [p / s for s, p in zip(r0["single"], r0["parallel"])]
    print(
        f"Wan transformer, {args.layers} layers, hidden {args.hidden}, {tokens} video tokens + {TEXT_TOKENS} text,"
        f" batch 1; a step = conditional + unconditional call; {args.threads} thread(s) per process,"
        f" {args.reps} steps after the first"
    )
    print(f"  one process       : {single:.3f} s per step (spread {min(r0['single']):.3f}-{max(r0['single']):.3f})")
    print(f"  cfg=2 on 2 ranks  : {par:.3f} s per step (spread {min(r0['parallel']):.3f}-{max(r0['parallel']):.3f})")
    print(
        f"  ratio parallel / one process: {par / single:.2f} (median of per-step ratios"
        f" {statistics.median(ratios):.2f}; target <= 0.6)"
    )
    print(f"  ratio of the fastest steps: {min(r0['parallel']) / min(r0['single']):.2f}")
    ceiling = statistics.median(c / s for s, c in zip(r0["single"], r0["ceiling"]))
    print(
        f"  what this machine allows now: both ranks running one plain call at once / one process's step ="
        f" {ceiling:.2f} (0.5 with two free cores)"
    )
    cpu_ratio = statistics.median(r0["parallel_cpu"]) / statistics.median(r0["single_cpu"])
    print(
        f"  CPU seconds per step, busiest rank / one process: {cpu_ratio:.2f} (the work split, whatever the free cores)"
    )
    print(
        f"  first step (the call pattern is learned: both calls on both ranks): {r0['first'][1]:.3f} s vs"
        f" {r0['first'][0]:.3f} s in one process"
    )
    print(
        f"  DiT forwards per rank: computed {r0['computed']} / {r1['computed']}, skipped {r0['skipped']} /"
        f" {r1['skipped']} (one process: {2 * (args.reps + 1)})"
    )
    same = r0["latents"] == r1["latents"]
    print(
        f"  max relative error of the latents after each step (rank 0 against one process): {max(r0['errors']):.1e};"
        f" rank 1's latents {'equal' if same else 'DIFFER from'} rank 0's"
    )
    per_step = statistics.median(r0["sent"]), statistics.median(r1["sent"])
    print(
        f"  bytes sent per step: rank 0 {per_step[0]} B, rank 1 {per_step[1]} B; the output is"
        f" {r0['output_bytes']} B (DESIGN.md: one all-gather of the output, i.e. each rank sends its output once)"
    )


if __name__ == "__main__":
    main()
