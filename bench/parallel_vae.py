"""Parallel VAE decode: peak memory of the decode per rank, time and bytes exchanged, against one process.

An ``AutoencoderKL`` of Stable Diffusion's width (block channels 128/256/512/512, 2 layers per block, 32 groups,
mid-block attention; random weights: memory, time and bytes do not depend on them) decodes a latent of
``--latent`` x ``--latent`` (64: a 512 x 512 image). The ranks are started once. Timing run: alternating, rank 0
decodes alone with the plain VAE (the one-process figure; the other ranks wait at a barrier) and all ranks decode
with the banded VAE; every process has the same threads (a rank stands for a device). Memory run (a separate start,
glibc returning freed blocks at once): the peak RSS growth of one decode in one process and per rank, above what
the process holds before it (weights included in neither). The "ceiling" is the speedup a perfect split would
reach on the machine at the time: N times the one-process time over the time of N processes each decoding the whole
latent at once; the CPU-seconds ratio (one process / the busiest rank) is the split of the work, whatever the load. With
``--device cuda`` (NCCL, one GPU per rank) memory is ``torch.cuda.max_memory_allocated`` growth instead.

Bytes: each rank's sends during one banded decode (``CommCounter``) next to the figures predicted from the decoder's
layers: halo rows of every convolution (point-to-point; DESIGN.md table: "halo rows per convolution"), the
group-norm statistics (3 float64 per sample and group per norm, all-gather), the mid-block attention's keys and
values and the output bands (all-gathers, not in the table).

    python bench/parallel_vae.py                       # SD-width VAE, 64 x 64 latent, 2 ranks
    python bench/parallel_vae.py --ranks 4 --reps 2
    python bench/parallel_vae.py --latent 32 --reps 2  # quicker
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL
from torch import nn

from lightning_dit_parallel.parallel.vae import apply_parallel_vae, band_rows, vae_cut_for
from lightning_dit_parallel.testing.comm_counter import CommCounter
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.memory import current_rss, peak_rss, reset_peak_rss, resident_bytes
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

MiB = 2**20


def build(args: argparse.Namespace) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=8 * args.latent,
    ).eval()
    vae.encoder = None  # decode only: the encoder's weights would only add to every process' baseline
    return vae.to(args.device)


def expected_bytes(vae: AutoencoderKL, z: torch.Tensor, ranks: int, rank: int) -> tuple[dict[str, float], torch.Tensor]:
    """Bytes ``rank`` sends in one banded decode of ``z``, predicted from the decoder's layers (float32), and the
    one-process decode of ``z``.

    A one-process decode records the input of every convolution with a halo and every group norm; at a layer where
    the whole image has ``H`` rows, band ``i`` has ``band_rows(latent, N)[i] * H / latent`` rows.
    """
    latent = z.shape[-2]
    rows = band_rows(latent, ranks)
    shapes: dict[str, list] = {"conv": [], "norm": [], "attention": []}
    handles = []
    for module in vae.decoder.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            handles.append(
                module.register_forward_pre_hook(lambda m, a: shapes["conv"].append((a[0].shape, m.padding[0])))
            )
        elif isinstance(module, nn.GroupNorm):
            handles.append(
                module.register_forward_pre_hook(lambda m, a: shapes["norm"].append((a[0].shape[0], m.num_groups)))
            )
        elif type(module).__name__ == "Attention":
            handles.append(module.register_forward_pre_hook(lambda m, a: shapes["attention"].append(a[0].shape)))
    with torch.no_grad():
        out = vae.decode(z).sample
    for handle in handles:
        handle.remove()
    peers = ranks - 1
    figures = {"p2p": 0.0, "all_gather norm": 0.0, "all_gather attention": 0.0, "all_gather output": 0.0}
    for (b, c, h, w), pad in shapes["conv"]:  # 'pad' rows to each neighbour: down unless last, up unless first
        neighbours = (rank > 0) + (rank < ranks - 1)
        figures["p2p"] += neighbours * pad * b * c * w * 4
    for b, groups in shapes["norm"]:
        figures["all_gather norm"] += 3 * b * groups * 8 * peers
    for b, c, h, w in shapes["attention"]:  # keys and values of the tallest band, padded for the all-gather
        figures["all_gather attention"] += 2 * b * c * max(rows) * (h // latent) * w * 4 * peers
    b, c, h, w = out.shape
    figures["all_gather output"] = b * c * max(rows) * (h // latent) * w * 4 * peers
    return figures, out


def _measure_memory(device: str, step) -> int:
    """Growth of the peak memory (bytes) above what the process holds, while ``step()`` runs."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    reset_peak_rss()
    before = current_rss()
    step()
    return peak_rss() - before


def _return_freed_memory() -> None:
    """glibc gives large freed blocks back at once (fixed mmap threshold): the peak RSS growth then measures what
    the decode allocates, not how much freed memory it reuses (memory run only: it costs page faults)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, args: argparse.Namespace, memory_run: bool) -> dict:
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    elif memory_run:
        _return_freed_memory()
    vae = build(args)
    z = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(1)).to(args.device)
    cut = vae_cut_for(vae)

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(z).sample

    def banded() -> torch.Tensor:
        parallel = apply_parallel_vae(vae, cut, dist.group.WORLD)
        try:
            with torch.no_grad():
                return vae.decode(z).sample
        finally:
            parallel.remove()

    if memory_run:
        single = 0
        dist.barrier()
        if rank == 0:
            plain()  # warm-up (kernels, allocator)
            single = _measure_memory(args.device, plain)
        dist.barrier()
        banded()  # warm-up
        parallel = _measure_memory(args.device, banded)
        return {"single": single, "parallel": parallel, "weights": resident_bytes(vae)}
    expected, reference = expected_bytes(vae, z, world, rank)  # also the warm-up of the plain decode
    with CommCounter() as counter:
        out = banded()
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    single, par, concurrent = [], [], []
    for _ in range(args.reps):
        single.append(time_rank_zero(plain))  # (wall, cpu) seconds
        par.append(time_all_ranks(banded))
        concurrent.append(time_all_ranks(plain)[0])  # every rank decodes the whole latent at once
    return {
        "single": single,
        "parallel": par,
        "concurrent": concurrent,
        "error": error,
        "bytes": dict(counter.bytes_sent),
        "expected": expected,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64: a 512 x 512 image)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks and the baseline)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL, one GPU per rank")
    parser.add_argument("--skip-memory", action="store_true", help="only the timing run (time and bytes)")
    args = parser.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    print(
        f"AutoencoderKL (SD widths) decode of a {args.latent} x {args.latent} latent ({8 * args.latent} x"
        f" {8 * args.latent} image) on {args.ranks} ranks ({args.device}, {args.threads} thread(s) per process)"
    )
    if not args.skip_memory:
        memory = run_on_ranks(args.ranks, _worker, args, True, threads=args.threads, timeout_s=3600, backend=backend)
        single, worst = memory[0]["single"], max(m["parallel"] for m in memory)
        print(f"\nweights per process: {memory[0]['weights'] / MiB:.0f} MiB (the whole VAE; not in the figures below)")
        per_rank = ", ".join(f"{m['parallel'] / MiB:.0f}" for m in memory)
        print(
            f"peak memory of the decode: one process {single / MiB:.0f} MiB; per rank {per_rank} MiB; ratio (busiest"
            f" rank / one process) {worst / single:.2f}"
        )
    timing = run_on_ranks(args.ranks, _worker, args, False, threads=args.threads, timeout_s=3600, backend=backend)
    r = timing[0]
    single_wall, par_wall = [s[0] for s in r["single"]], [p[0] for p in r["parallel"]]
    speedup = statistics.median(s / p for s, p in zip(single_wall, par_wall))
    ceiling = statistics.median(args.ranks * s / c for s, c in zip(single_wall, r["concurrent"]))
    cpu = statistics.median(s[1] / p[1] for s, p in zip(r["single"], r["parallel"]))
    print(
        f"time: one process {statistics.median(single_wall):.2f} s,"
        f" {args.ranks} ranks {statistics.median(par_wall):.2f} s"
        f" (spread {min(par_wall):.2f}-{max(par_wall):.2f}); speedup {speedup:.2f}x, ceiling {ceiling:.2f}x (N x one"
        f" process / N processes decoding the whole latent at once), CPU seconds one process / busiest rank {cpu:.2f}x"
        " (medians of adjacent ratios)"
    )
    print(f"max relative error against one process: {max(t['error'] for t in timing):.1e}")
    print("\nbytes sent per rank per decode, measured / predicted from the decoder's layers:")
    for rank, t in enumerate(timing):
        measured, expected = t["bytes"], t["expected"]
        gathered = sum(v for k, v in expected.items() if k.startswith("all_gather"))
        parts = ", ".join(f"{k.split()[1]} {v / MiB:.3f}" for k, v in expected.items() if k.startswith("all_gather"))
        print(
            f"  rank {rank}: halo p2p {measured.get('p2p', 0) / MiB:.3f} / {expected['p2p'] / MiB:.3f} MiB;"
            f" all-gather {measured.get('all_gather', 0) / MiB:.3f} / {gathered / MiB:.3f} MiB ({parts})"
        )


if __name__ == "__main__":
    main()
