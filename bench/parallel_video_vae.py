"""Parallel VAE decode of the video VAEs (and Sana's DC-AE): peak decode memory per rank against one process.

Tiny-channel VAEs (``tests/video_vaes.py``: 8-16 channels, Mochi 32-64) decode large latents, so the activations
dominate and the weights are negligible. The ranks are started once per rank count; for each VAE, rank 0 first
decodes alone with the plain VAE (the one-process figure; the other ranks wait at a barrier), then every rank decodes
with the banded VAE. Memory is the growth of the peak resident set size (``VmHWM``, reset before each decode) above
what the process holds before it, with glibc returning freed blocks at once (so the peak measures what the decode
allocates, as in ``bench/parallel_vae.py``). Every banded decode is checked against the one-process output (max
relative error, printed). The latent heights do not divide the rank counts.

CPU caveat (torch's choice of convolution kernel, not the decode): ``nn.Conv3d`` on CPU runs an unfold (im2col)
kernel, whose buffer is ``27 x`` the input, when ``N * C * T * H <= 20480`` for a ``(N, C, T, H, W)`` input, and a
oneDNN kernel without that buffer above it. A band has fewer rows ``H`` than the whole video, so a band can fall under
the threshold while the whole video does not: Mochi's decoder (32 channels at the output) at a latent of 49 x 64 took
about 2x the one-process memory per rank on 2 ranks for this reason. The Mochi latent here is tall and narrow so that
the output-level bands stay above it (the 64-channel latent level does not, on 4 ranks). CUDA (cuDNN) has no such
switch.

    python bench/parallel_video_vae.py                 # 2 and 4 ranks
    python bench/parallel_video_vae.py --ranks 2 --scale 0.5
"""

from __future__ import annotations

import argparse
import ctypes

import torch
import torch.distributed as dist

from lightning_dit_parallel.parallel.vae import apply_parallel_vae, vae_cut_for
from lightning_dit_parallel.utils.memory import current_rss, peak_rss, reset_peak_rss
from lightning_dit_parallel.utils.multiprocess import run_on_ranks
from tests.video_vaes import BUILDERS

MiB = 2**20

#: VAE -> latent shape at --scale 1 (heights and widths multiplied by the scale; heights made odd).
LATENTS = {
    "cogvideox": (1, 4, 3, 64, 64),
    "ltx": (1, 4, 2, 64, 64),
    "hunyuan": (1, 4, 2, 40, 48),
    "mochi": (1, 4, 2, 137, 32),  # tall: see the module's docstring
    "dc": (1, 4, 192, 192),
}
CLASSES = {
    "cogvideox": "AutoencoderKLCogVideoX",
    "ltx": "AutoencoderKLLTXVideo",
    "hunyuan": "AutoencoderKLHunyuanVideo",
    "mochi": "AutoencoderKLMochi",
    "dc": "AutoencoderDC",
}


def latent_shape(name: str, scale: float) -> tuple[int, ...]:
    *lead, h, w = LATENTS[name]
    h = max(int(h * scale), 9) | 1  # odd: never divides 2 or 4 ranks
    return (*lead, h, max(int(w * scale), 8))


def _return_freed_memory() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _peak_growth(step) -> tuple[int, torch.Tensor]:
    """Growth of the peak RSS (bytes) above what the process holds while ``step()`` runs, and its result."""
    reset_peak_rss()
    before = current_rss()
    out = step()
    return peak_rss() - before, out


def _worker(rank: int, world: int, scale: float) -> dict:
    _return_freed_memory()
    results = {}
    for name, build in BUILDERS.items():
        vae = build()
        vae.encoder = None  # decode only
        z = torch.randn(*latent_shape(name, scale), generator=torch.Generator().manual_seed(1))
        extra = {"temb": torch.full((z.shape[0],), 0.05)} if name == "ltx" else {}

        def decode() -> torch.Tensor:
            torch.manual_seed(5)  # LTX's decoder draws noise: the same draws in one process and on every rank
            with torch.no_grad():
                return vae.decode(z, **extra).sample

        single, reference = 0, None
        dist.barrier()
        if rank == 0:
            decode()  # warm-up
            single, reference = _peak_growth(decode)
        dist.barrier()
        parallel = apply_parallel_vae(vae, vae_cut_for(vae), dist.group.WORLD)
        try:
            decode()  # warm-up
            banded_peak, out = _peak_growth(decode)
        finally:
            parallel.remove()
        error = None
        if reference is not None:
            error = ((out - reference).abs().max() / reference.abs().max()).item()
        results[name] = {
            "single": single,
            "parallel": banded_peak,
            "error": error,
            "shape": tuple(z.shape),
            "output": tuple(out.shape),
            "output_bytes": out.numel() * out.element_size(),
        }
        # Release the model before the next one is built (after ``del vae``, pyflakes reads ``decode`` as using an
        # unbound name).
        vae = out = reference = None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--scale", type=float, default=1.0, help="latent height and width multiplier")
    args = parser.parse_args()
    if not reset_peak_rss():
        raise SystemExit("This benchmark needs Linux /proc/self/clear_refs to reset the peak RSS.")
    rows: dict[str, dict[int, tuple[float, float, float]]] = {}
    for ranks in args.ranks:
        per_rank = run_on_ranks(ranks, _worker, args.scale, threads=1, timeout_s=3600)
        for name in BUILDERS:
            single = per_rank[0][name]["single"]
            worst = max(r[name]["parallel"] for r in per_rank)
            rows.setdefault(name, {})[ranks] = (single, worst, per_rank[0][name]["error"])
            r0 = per_rank[0][name]
            each = ", ".join(f"{r[name]['parallel'] / MiB:.1f}" for r in per_rank)
            print(
                f"{CLASSES[name]:26s} latent {r0['shape']} -> {r0['output']} on {ranks} ranks: one process"
                f" {single / MiB:6.1f} MiB, per rank {each} MiB; busiest / one process {worst / single:.2f}"
                f" (output {r0['output_bytes'] / MiB:.1f} MiB, gathered whole on every rank); max relative error"
                f" {r0['error']:.1e}"
            )
    print("\n| VAE | " + " | ".join(f"peak per rank / one process, {n} ranks" for n in args.ranks) + " |")
    print("|---|" + "---|" * len(args.ranks))
    for name, by_ranks in rows.items():
        print(f"| {CLASSES[name]} | " + " | ".join(f"{w / s:.2f}" for s, w, _ in by_ranks.values()) + " |")


if __name__ == "__main__":
    main()
