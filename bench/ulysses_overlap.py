"""Ulysses with and without overlap, side by side in one run: the all-to-all of one head group travelling while the
attention of another runs (``ulysses_overlap`` / ``ulysses_attention(head_groups=G)``) against the plain Ulysses
(G = 1: one all-to-all each way).

Two workloads, both on the same ranks, started once, every variant measured in each repetition (interleaved, so
the machine's drift cancels in the ratios):

* ``attention``: one Ulysses attention call on (B, H, S/U, D) shards, plus a control and its two parts alone: the
  largest head-group count with every all-to-all waited for at once (``no overlap``: what grouping alone changes),
  the local attention of H/U heads over S tokens, and the all-to-all of q, k, v and out (the smaller of the last two
  bounds what overlap can hide);
* ``dit``: a small diffusers ``DiTTransformer2DModel`` parallelized with ``parallelize(..., ulysses_overlap=G)``.

Reported: the median time of each variant (slowest rank), the median ratio plain / overlapped (> 1: overlap is
faster), and the largest difference from the plain output (exact: the same math). Each rank runs with the same
number of torch threads (``--threads``).

    python bench/ulysses_overlap.py                          # CPU, gloo, 2 ranks, 4096 tokens
    python bench/ulysses_overlap.py --backend nccl           # one GPU per rank (needs --ranks GPUs)
    python bench/ulysses_overlap.py --groups 2 4 8 --reps 9 --workloads attention
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from lightning_dit_parallel.parallel.sequence.comm import PendingAllToAll
from lightning_dit_parallel.parallel.sequence.ulysses import (
    HeadsToSequence,
    QKVToHeads,
    head_group_sizes,
    ulysses_attention,
)
from lightning_dit_parallel.utils.multiprocess import run_on_ranks


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn`` on the slowest rank (a collective: call on every rank)."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - start], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _attention_variants(args: argparse.Namespace, world: int, device: torch.device) -> tuple[dict, dict]:
    """Variants of one Ulysses attention call: name -> fn, and the outputs of the exact ones (name -> tensor)."""
    local = -(-args.tokens // world)  # ceil: the last shard padded, as the sharding does
    gen = torch.Generator().manual_seed(dist.get_rank())
    shape = (args.batch, args.heads, local, args.head_dim)  # (B, H, S/U, D)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float32).to(device, args.dtype) for _ in range(3))
    whole = (args.batch, args.heads // world, local * world, args.head_dim)  # (B, H/U, S, D)
    qh, kh, vh = (torch.randn(whole, generator=gen, dtype=torch.float32).to(device, args.dtype) for _ in range(3))
    group = dist.group.WORLD
    fns: dict[str, Callable[[], object]] = {}
    for g in args.groups:
        fns[f"G={g}"] = lambda g=g: ulysses_attention(q, k, v, group, None, None, head_groups=g)
    most = max(args.groups)
    if (
        most > 1
    ):  # control: the same head groups, each all-to-all waited for at once (what grouping costs or saves alone)
        sizes = head_group_sizes(args.heads, world, most)

        def grouped_without_overlap():
            outs = []
            for qg, kg, vg in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1)):
                qg, kg, vg = QKVToHeads(qg, kg, vg, group).wait()  # 3 x (B, H_g, S/U, D) -> 3 x (B, H_g/U, S, D)
                out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)  # (B, H_g/U, S, D)
                outs.append(HeadsToSequence(out, group).wait())  # -> (B, H_g, S/U, D)
            return torch.cat(outs, dim=1)  # G x (B, H_g, S/U, D) -> (B, H, S/U, D)

        fns[f"G={most} no overlap"] = grouped_without_overlap
    fns["attention only"] = lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    stacked = torch.stack([q, k, v]).reshape(world, -1)  # (3, B, H, S/U, D) -> (U, 3*B*H*S/U*D/U): the q, k, v bytes

    def all_to_all_only():
        PendingAllToAll(stacked, group).wait()  # q, k, v in
        PendingAllToAll(stacked[:, : stacked.shape[1] // 3], group).wait()  # out back

    fns["all-to-all only"] = all_to_all_only
    outputs = {name: fns[name]() for name in fns if name.startswith("G=")}  # the exact variants
    return fns, outputs


def _dit_variants(args: argparse.Namespace, world: int, device: torch.device) -> tuple[dict, dict]:
    """Variants of a small DiT forward, one parallelized copy of the same seeded model per head-group count."""
    from diffusers import DiTTransformer2DModel

    from lightning_dit_parallel import ParallelLayout, parallelize

    side = round(args.tokens**0.5)
    if side * side != args.tokens:
        raise ValueError(f"--tokens must be a square number for the DiT workload, got {args.tokens}.")
    layout = ParallelLayout(ulysses=world).resolve(world)
    mesh = layout.build_mesh(device.type)
    x = torch.randn(args.batch, 4, 2 * side, 2 * side, generator=torch.Generator().manual_seed(1)).to(
        device, args.dtype
    )
    t = torch.full((args.batch,), 10, device=device)
    labels = torch.arange(args.batch, device=device) % 10
    fns, outputs = {}, {}
    for g in args.groups:
        torch.manual_seed(0)
        model = (
            DiTTransformer2DModel(
                num_attention_heads=args.heads,
                attention_head_dim=args.head_dim,
                in_channels=4,
                out_channels=4,
                num_layers=args.layers,
                sample_size=2 * side,
                patch_size=2,
                num_embeds_ada_norm=10,
                norm_num_groups=4,
            )
            .eval()
            .to(device)
        )
        if args.dtype != torch.float32:
            model.to(args.dtype)
        parallelize(model, layout, mesh, ulysses_overlap=g)

        def forward(model=model):
            with torch.no_grad():
                return model(x, timestep=t, class_labels=labels, return_dict=False)[0]

        fns[f"G={g}"] = forward
        outputs[f"G={g}"] = forward()
    return fns, outputs


def _worker(rank: int, world: int, args: argparse.Namespace, workload: str) -> dict:
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    build = _attention_variants if workload == "attention" else _dit_variants
    fns, outputs = build(args, world, device)
    reference = outputs[f"G={args.groups[0]}"].float()
    errors = {
        name: ((out.float() - reference).abs().max() / reference.abs().max()).item() for name, out in outputs.items()
    }
    for fn in fns.values():  # warm-up
        _timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {"times": times, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2, help="DiT blocks of the dit workload")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--groups", type=int, nargs="+", default=[1, 2, 4], help="head groups; the first is the baseline"
    )
    parser.add_argument("--workloads", nargs="+", default=["attention", "dit"], choices=["attention", "dit"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.heads % args.ranks or max(args.groups) > args.heads // args.ranks:
        parser.error(
            f"--heads {args.heads} must divide by --ranks {args.ranks}, and --groups be at most the"
            f" {args.heads // args.ranks} heads per rank; got {args.groups}."
        )
    if args.backend == "nccl" and torch.cuda.device_count() < args.ranks:
        print(
            f"ulysses overlap benchmark: --backend nccl needs {args.ranks} GPUs (one per rank), found"
            f" {torch.cuda.device_count()}; nothing measured."
        )
        return
    print(
        f"Ulysses overlap, {args.ranks} ranks ({args.backend}), {args.tokens} tokens, {args.heads} heads x"
        f" {args.head_dim}, batch {args.batch}, {str(args.dtype).removeprefix('torch.')}, {args.threads} thread(s) per"
        f" rank, {args.reps} reps after warm-up; baseline G={args.groups[0]}"
    )
    for workload in args.workloads:
        title = "one attention call" if workload == "attention" else f"DiT forward, {args.layers} blocks"
        r = run_on_ranks(
            args.ranks, _worker, args, workload, threads=args.threads, timeout_s=1200, backend=args.backend
        )[0]
        base = r["times"][f"G={args.groups[0]}"]
        print(f"\n{title}:")
        print(f"  {'variant':16} {'median ms':>10} {'min-max ms':>16} {'plain/this':>11} {'rel err':>8}")
        for name, times in r["times"].items():
            ratio = statistics.median(b / t for b, t in zip(base, times))  # adjacent measurements: drift cancels
            err = r["errors"].get(name)
            err_text = f"{err:>8.1e}" if err is not None else f"{'-':>8}"
            ratio_text = f"{ratio:>10.2f}x" if name.startswith("G=") else f"{'-':>11}"
            print(
                f"  {name:16} {1e3 * statistics.median(times):>10.2f} {1e3 * min(times):>7.2f}-{1e3 * max(times):<8.2f}"
                f" {ratio_text} {err_text}"
            )


if __name__ == "__main__":
    main()
