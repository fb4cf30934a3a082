"""CFG parallel, FSDP, pipeline and hybrid layouts: speedup, memory per rank and bytes sent, against one process.

A rank stands for a device: every process runs with the same number of threads (default 1). For each layout
the ranks are started once; inside them, alternating, rank 0 times the plain model alone (the one-process
figure; the other ranks wait at a barrier) and then all ranks time the parallelized copy of the same seeded
model. One timed call is one denoising step: a DiT forward over the doubled (unconditional, conditional)
batch. Data-parallel layouts give every dp group its own batch; the one-process figure then runs all of
them in one forward (the same work).

Reported per layout: median step time of each, their ratio, the spread, the output's error against the plain
model, the ratio of CPU seconds per step (one process / the busiest rank: the work split, whatever the load),
parameter bytes resident per rank between steps (local shards, each storage once) as a fraction of the whole
model, the peak RSS growth of a step per rank and in one process, and the bytes each rank sent during one step
next to the figure the table in DESIGN.md predicts. A second table measures loading: the peak RSS growth of a rank while
it reads the weights from safetensors (model built on the meta device, parallelized, then only what the rank
keeps read), against one process loading the whole model the same way.

    python bench/hybrid.py                                      # cfg2, fsdp_ulysses2, fsdp_dp2, pp2 + loading
    python bench/hybrid.py --layouts cfg2 --reps 3
    python bench/hybrid.py --layouts cfg2_ulysses2_fsdp         # 4 ranks (oversubscribed on a 2-core machine)
    python bench/hybrid.py --layouts fsdp_ulysses2 --fsdp-units blocks   # FSDP gathering whole blocks
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.loading import build_on_meta, defer_weights, materialize, save_weights
from lightning_dit_parallel.parallel.fsdp import resolve_fsdp_units
from lightning_dit_parallel.planner.spec import linear_parameters
from lightning_dit_parallel.testing.comm_counter import CommCounter
from lightning_dit_parallel.testing.timing import time_all_ranks, time_rank_zero
from lightning_dit_parallel.utils.memory import current_rss, peak_rss, reset_peak_rss, resident_bytes
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

#: name -> ParallelLayout keyword arguments.
LAYOUTS: dict[str, dict] = {
    "cfg2": dict(cfg=2),
    "fsdp_ulysses2": dict(ulysses=2, fsdp=True),
    "fsdp_dp2": dict(dp=2, fsdp=True),
    "pp2": dict(pp=2),
    "cfg2_ulysses2_fsdp": dict(cfg=2, ulysses=2, fsdp=True),
    "cfg2_pp2": dict(cfg=2, pp=2),
    "ulysses2": dict(ulysses=2),  # for comparison: what FSDP adds to Ulysses
}
DEFAULT_LAYOUTS = ("cfg2", "fsdp_ulysses2", "fsdp_dp2", "pp2")
LOAD_LAYOUTS = ("fsdp_dp2", "pp2")
MiB = 2**20


def config(tokens: int, hidden: int, heads: int, layers: int) -> dict:
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"--tokens must be a square number (patch grid side**2), got {tokens}.")
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        sample_size=2 * side,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    )


def build(cfg: dict) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(**cfg).eval()


def expected_bytes(
    layout: ParallelLayout, cfg: dict, tokens: int, batch: int, param_bytes: int, streamed_bytes: int = 0
) -> dict[str, float]:
    """Bytes one rank sends in one step, from the DESIGN.md table (float32), for the parts the table covers.

    ``batch`` is the batch one model-parallel group computes (the doubled CFG batch); ``streamed_bytes``: the part of
    ``param_bytes`` FSDP broadcasts by rows (``fsdp_units="rows"``: the plain Linears'), the rest is all-gathered.
    """
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    out_bytes = batch * cfg["out_channels"] * cfg["sample_size"] ** 2 * 4
    figures: dict[str, float] = {}
    seq = layout.sequence_degree
    per_cfg = batch // int(layout.cfg)
    if int(layout.ulysses) > 1:  # q, k, v, out: each (U-1)/U of the local (p/N x hs) tensor
        ulysses = int(layout.ulysses)
        figures["all_to_all"] = layers * 4 * (ulysses - 1) / ulysses * tokens * hidden * 4 * per_cfg / seq
    gather = rows = 0.0
    if layout.fsdp:  # each rank sends its 1/N shard of every parameter to the N-1 others
        n = int(layout.dp) * int(layout.cfg) * seq
        gather += (param_bytes - streamed_bytes) / int(layout.pp) * (n - 1) / n
        rows = streamed_bytes / int(layout.pp) * (n - 1) / n  # broadcast by the rows' ranks
    if int(layout.cfg) > 1:  # one all-gather of the output: this rank's half to the other rank
        gather += out_bytes / int(layout.cfg) * (int(layout.cfg) - 1)
    if gather:
        figures["all_gather"] = gather
    if int(layout.pp) > 1:  # activations (p x hs, all micro-batches) across a stage boundary; the last stage's output
        figures["p2p"] = tokens * hidden * 4 * per_cfg / seq
        figures["broadcast"] = out_bytes / int(layout.cfg) * (int(layout.pp) - 1)
    if rows:
        figures["broadcast"] = figures.get("broadcast", 0.0) + rows
    return figures


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once (fixed mmap threshold), so that the peak
    RSS growth of a step measures what the step allocates rather than how much freed memory it reuses. Only in
    the memory run: unmapping every large block on free costs page faults, which would distort the timings."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: blocks >= 64 KiB are mmapped and unmapped on free
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _step_peak(step) -> int:
    """Peak RSS growth (bytes) of this process while ``step()`` runs."""
    reset_peak_rss()
    before = current_rss()
    step()
    return peak_rss() - before


def _step_worker(rank: int, world: int, args: argparse.Namespace, name: str, memory_run: bool = False) -> dict:
    """Times the layout against one process; with ``memory_run``, measures the peak RSS growth of a step instead."""
    if memory_run:
        _return_freed_memory()
    cfg = config(args.tokens, args.hidden, args.heads, args.layers)
    layout = ParallelLayout(**LAYOUTS[name]).resolve(world)
    plain = build(cfg)
    full_bytes = resident_bytes(plain, buffers=False)
    parallel = build(cfg)
    handle = parallelize(parallel, layout, layout.build_mesh("cpu"), fsdp_units=args.fsdp_units)
    units = resolve_fsdp_units(args.fsdp_units, int(layout.tp))
    streamed = linear_parameters(plain)
    streamed_bytes = sum(p.numel() * p.element_size() for p in plain.parameters() if id(p) in streamed)
    dp, dp_rank = int(layout.dp), layout.coordinates(rank)["dp"]
    batch = 2 * args.batch  # the doubled CFG batch of one dp group
    side = 2 * int(round(args.tokens**0.5))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(dp * batch, 4, side, side, generator=generator)  # every dp group's batch, one after the other
    t = torch.full((dp * batch,), 10)
    labels = torch.arange(dp * batch) % 10
    mine = slice(dp_rank * batch, (dp_rank + 1) * batch)

    def forward(model, rows: slice):
        if model is parallel:  # every timed call is a denoising step of a batch of its own (CFG's call pattern)
            handle.begin_batch()
        with torch.no_grad():
            return model(x[rows], timestep=t[rows], class_labels=labels[rows], return_dict=False)[0]

    reference = forward(plain, mine)
    # isend is wrapped for the pipeline's transfers, except where ring attention's P2POps need the original
    counter = CommCounter(count_isend=int(layout.ring) == 1)
    with counter:
        out = forward(parallel, mine)  # also the warm-up
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    held = resident_bytes(parallel, buffers=False)
    time_rank_zero(lambda: forward(plain, slice(None)))  # warm-up of the plain model
    if memory_run:
        return {
            "par_peak": _step_peak(lambda: time_all_ranks(lambda: forward(parallel, mine))),
            "single_peak": _step_peak(lambda: time_rank_zero(lambda: forward(plain, slice(None)))),
        }
    single, par, single_cpu, par_cpu = [], [], [], []
    for _ in range(args.reps):
        wall, cpu = time_rank_zero(lambda: forward(plain, slice(None)))
        single.append(wall)
        single_cpu.append(cpu)
        wall, cpu = time_all_ranks(lambda: forward(parallel, mine))
        par.append(wall)
        par_cpu.append(cpu)
    return {
        "single": single,
        "parallel": par,
        "single_cpu": single_cpu,
        "parallel_cpu": par_cpu,
        "error": error,
        "bytes": dict(counter.bytes_sent),
        "held": held,
        "full": full_bytes,
        "expected": expected_bytes(
            layout, cfg, args.tokens, batch, full_bytes, streamed_bytes if units == "rows" else 0
        ),
    }


def _save_worker(rank: int, world: int, cfg: dict, file: str) -> int:
    model = build(cfg)
    save_weights(model, file)
    return resident_bytes(model, buffers=False)


def _load_worker(rank: int, world: int, args: argparse.Namespace, name: str | None, file: str) -> dict:
    """Peak RSS growth while this rank reads its part of the weights (``name=None``: the whole model)."""
    cfg = config(args.tokens, args.load_hidden, args.heads, args.load_layers)
    model = defer_weights(build_on_meta(lambda: DiTTransformer2DModel(**cfg).eval()), file)
    if name is not None:
        layout = ParallelLayout(**LAYOUTS[name]).resolve(world)
        parallelize(model, layout, layout.build_mesh("cpu"), fsdp_units=args.fsdp_units)
    reset_peak_rss()
    before = current_rss()
    materialize(model)
    return {"growth": peak_rss() - before, "held": resident_bytes(model, buffers=False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--layouts",
        nargs="*",
        default=list(DEFAULT_LAYOUTS),
        choices=list(LAYOUTS),
        help="layouts of the step table (none: loading only)",
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="samples per dp group (the DiT sees twice as many)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks and the baseline)")
    parser.add_argument("--load-hidden", type=int, default=1024, help="hidden size of the model in the loading table")
    parser.add_argument("--load-layers", type=int, default=4)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument(
        "--fsdp-units",
        default="auto",
        choices=["auto", "blocks", "layers", "rows"],
        help="FSDP's units (parallelize's fsdp_units; auto: rows streaming)",
    )
    args = parser.parse_args()

    # rejects a --tokens that is not square, before any launch
    config(args.tokens, args.hidden, args.heads, args.layers)
    print(
        f"one step = DiT forward over the doubled batch ({2 * args.batch} rows per dp group), {args.tokens} tokens,"
        f" hidden {args.hidden}, {args.heads} heads, {args.layers} layers; {args.threads} thread(s) per process,"
        f" {args.reps} reps after warm-up, one process and the layout alternating"
    )
    print(
        f"{'layout':20} {'ranks':>5} {'1 proc s':>9} {'layout s':>9} {'speedup':>8} {'spread s':>12} {'rel err':>8}"
        f" {'CPU-time ratio':>14} {'params/rank':>12} {'step peak MiB':>14}"
    )
    rows = []
    for name in args.layouts:
        layout = ParallelLayout(**LAYOUTS[name])
        world = _world(layout)
        results = run_on_ranks(world, _step_worker, args, name, threads=args.threads, timeout_s=1800)
        memory = run_on_ranks(world, _step_worker, args, name, True, threads=args.threads, timeout_s=1800)
        r0 = results[0]
        single, par = statistics.median(r0["single"]), statistics.median(r0["parallel"])
        held = max(r["held"] for r in results) / r0["full"]
        peak = f"{max(r['par_peak'] for r in memory) / MiB:.0f} / {memory[0]['single_peak'] / MiB:.0f}"
        cpu_ratio = statistics.median(r0["single_cpu"]) / statistics.median(r0["parallel_cpu"])
        spread = f"{min(r0['parallel']):.2f}-{max(r0['parallel']):.2f}"
        print(
            f"{name:20} {world:>5} {single:>9.3f} {par:>9.3f} {single / par:>7.2f}x {spread:>12} {r0['error']:>8.1e}"
            f" {cpu_ratio:>13.2f}x {held:>11.2f}x {peak:>14}"
        )
        rows.append((name, results))
    print(
        "\nCPU-time ratio: the one process's CPU seconds per step / the most CPU seconds any rank spent on the"
        " step (communication included); unlike the wall-clock speedup it does not depend on free cores"
    )
    print(
        "step peak: peak RSS growth during one step, the busiest rank / one process (activations, gathered"
        " parameters and communication buffers; measured in a separate run with large blocks unmapped on free)"
    )
    print(
        f"params/rank: the largest parameter bytes any rank holds between steps / the whole model"
        f" ({rows[0][1][0]['full'] / MiB:.1f} MiB)"
        if rows
        else ""
    )
    print("bytes sent per rank per step (measured: the most any rank sent / expected from DESIGN.md):")
    for name, results in rows:
        expected = results[0]["expected"]
        measured = {k: max(r["bytes"].get(k, 0) for r in results) for r in results for k in r["bytes"]}
        for kind in sorted(set(measured) | set(expected)):
            exp = expected.get(kind)
            exp_text = f"{exp / MiB:9.3f} MiB" if exp else "   (not in the table)"
            print(f"  {name:20} {kind:10} {measured.get(kind, 0) / MiB:9.3f} MiB / {exp_text}")

    if args.skip_load:
        return
    load_cfg = config(args.tokens, args.load_hidden, args.heads, args.load_layers)
    with tempfile.TemporaryDirectory() as tmp:
        file = str(Path(tmp) / "dit.safetensors")
        # saved by a child process: memory this process freed would be inherited, already resident, by the
        # forked loaders and hide their growth
        total = run_on_ranks(1, _save_worker, load_cfg, file, threads=args.threads, timeout_s=1800)[0]
        print(
            f"\nloading {total / MiB:.0f} MiB of weights (hidden {args.load_hidden}, {args.load_layers} layers) from"
            " safetensors: peak RSS growth per rank while reading"
        )
        single = run_on_ranks(1, _load_worker, args, None, file, threads=args.threads, timeout_s=1800)[0]
        print(f"  {'one process':20} growth {single['growth'] / MiB:8.1f} MiB, holds {single['held'] / MiB:8.1f} MiB")
        for name in LOAD_LAYOUTS:
            results = run_on_ranks(2, _load_worker, args, name, file, threads=args.threads, timeout_s=1800)
            growth = max(r["growth"] for r in results)
            held = max(r["held"] for r in results)
            print(
                f"  {name:20} growth {growth / MiB:8.1f} MiB ({growth / single['growth']:.2f} of one process),"
                f" holds {held / MiB:8.1f} MiB ({held / single['held']:.2f})"
            )


def _world(layout: ParallelLayout) -> int:
    return int(layout.dp) * int(layout.cfg) * int(layout.pp) * int(layout.ring) * int(layout.ulysses)


if __name__ == "__main__":
    main()
