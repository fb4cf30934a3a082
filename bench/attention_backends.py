"""The local kernels of sequence parallelism on each diffusers attention backend: time and accuracy on one device.

For every backend that can run here (diffusers' requirement and constraint checks), two kernels of
``lightning_dit_parallel.parallel.sequence.backends`` are timed against torch's SDPA on the same tensors:

* ``attend``: Ulysses' local attention (the backend itself, over the whole sequence of a rank's heads);
* ``attend+lse``: one Ring block with its log-sum-exp (the backend's own, or torch's kernel after a fallback).

It also checks, per backend, that two key blocks merged through their log-sum-exp equal attention over all keys (what
Ring relies on), as the max relative error against float32 math. Median of ``--reps`` timings after a warm-up.

    python bench/attention_backends.py                          # CUDA: bf16, B=1 H=24 S=4096 D=128
    python bench/attention_backends.py --device cpu --tokens 256 --heads 4 --dtype float32 --reps 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from lightning_dit_parallel.parallel.sequence.backends import check_backend, local_attend, local_attend_with_lse
from lightning_dit_parallel.parallel.sequence.local_attention import merge_partial

BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "_native_math",
    "flex",
    "flash",
    "_flash_3",
    "sage",
    "xformers",
)


def _time(fn, reps: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).abs().max() / ref.abs().max()).item()


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(args.batch, args.heads, args.tokens, args.head_dim, generator=g).to(device, dtype) for _ in range(3)
    )  # (B, H, S, D)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())  # float32
    half = args.tokens // 2
    rows = []
    sdpa_ms = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.reps, device)
    for name in args.backends:
        row = {"backend": name}
        try:
            check_backend(name, q, k, v, "bench")
            attend = local_attend(name, "bench")
            with_lse = local_attend_with_lse(name, "bench", "warn")
            row["attend_ms"] = _time(lambda: attend(q, k, v, attn_mask=None, scale=None), args.reps, device)
            row["lse_ms"] = _time(lambda: with_lse(q, k, v, None, None), args.reps, device)
            row["attend_err"] = _relative(attend(q, k, v, attn_mask=None, scale=None), reference)
            a, lse_a = with_lse(q, k[:, :, :half], v[:, :, :half], None, None)  # two ring blocks of keys
            b, lse_b = with_lse(q, k[:, :, half:], v[:, :, half:], None, None)
            row["merge_err"] = _relative(merge_partial(a, lse_a, b, lse_b)[0], reference)
        except Exception as err:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
            row["skipped"] = f"{type(err).__name__}: ...{str(err)[-110:]}"
        rows.append(row)
    print(
        f"device {device} {dtype} B={args.batch} H={args.heads} S={args.tokens} D={args.head_dim};"
        f" torch SDPA {sdpa_ms:.3f} ms"
    )
    print(
        f"{'backend':>18} {'attend ms':>10} {'x SDPA':>7} {'+lse ms':>9} {'attend err':>11} {'2-block merge err':>18}"
    )
    for row in rows:
        if "skipped" in row:
            print(f"{row['backend']:>18}  skipped: {row['skipped']}")
            continue
        print(
            f"{row['backend']:>18} {row['attend_ms']:10.3f} {row['attend_ms'] / sdpa_ms:7.2f} {row['lse_ms']:9.3f}"
            f" {row['attend_err']:11.2e} {row['merge_err']:18.2e}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24 if cuda else 4)
    parser.add_argument("--tokens", type=int, default=4096 if cuda else 256)
    parser.add_argument("--head-dim", type=int, default=128 if cuda else 64)
    parser.add_argument("--reps", type=int, default=10 if cuda else 3)
    parser.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS))
    logging.basicConfig(level=logging.WARNING)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
