"""Cost of the replicated-input guard (``check_inputs``) per DiT step, against the step itself.

Two ranks run Ulysses 2 on the same seeded DiT twice, one copy with the guard and one without, on the doubled
(CFG) batch of one sample. Reported per token count: the median step time without and with the guard checking
that step (alternating, adjacent pairs), and the guard alone: its pre-hook called on the same arguments
(fingerprints plus the all-gather over the group), timed over many calls. The ratio of the guard alone to a step
is the cost of a checked DiT call (``check_inputs="every_call"`` pays it in every step); the default checks the
first call of each batch, so a batch of ``--steps`` denoising steps pays it once: the last column. The with/without
difference is the same cost seen through the step's noise.

    python bench/input_guard.py                         # 1024 and 4096 tokens, hidden 256, 4 heads, 2 layers
    python bench/input_guard.py --tokens 4096 --layers 8 --reps 5
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusers import DiTTransformer2DModel

from lightning_dit_parallel import ParallelLayout, parallelize
from lightning_dit_parallel.parallel.guard import InputGuard
from lightning_dit_parallel.testing.timing import time_all_ranks
from lightning_dit_parallel.utils.multiprocess import run_on_ranks


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


def _worker(rank: int, world: int, args: argparse.Namespace, tokens: int) -> dict:
    layout = ParallelLayout(ulysses=world).resolve(world)
    mesh = layout.build_mesh("cpu")
    guarded, plain = (build(tokens, args.hidden, args.heads, args.layers) for _ in range(2))
    handle = parallelize(guarded, layout, mesh, check_inputs=True)
    parallelize(plain, layout, mesh, check_inputs=False)
    guard = next(item for item in handle.applied if isinstance(item, InputGuard))
    side = int(round(tokens**0.5))
    x = torch.randn(2, 4, 2 * side, 2 * side, generator=torch.Generator().manual_seed(1))  # doubled CFG batch
    t = torch.full((2,), 10)
    labels = torch.tensor([10, 3])
    kwargs = {"timestep": t, "class_labels": labels, "return_dict": False}

    def step(model):
        guard.begin_batch()  # every measured step of the guarded copy is checked (a first call of a batch)
        with torch.no_grad():
            return model(x, **kwargs)[0]

    def checks():
        for _ in range(args.calls):
            guard.begin_batch()
            guard._check(guarded, (x,), kwargs)

    step(guarded), step(plain), checks()  # warm-up
    with_guard, without, alone = [], [], []
    for _ in range(args.reps):
        without.append(time_all_ranks(lambda: step(plain))[0])
        with_guard.append(time_all_ranks(lambda: step(guarded))[0])
        alone.append(time_all_ranks(checks)[0] / args.calls)
    return {"with": with_guard, "without": without, "alone": alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50, help="guard calls per timing of the guard alone")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per batch (one checked call each)")
    args = parser.parse_args()
    print(
        f"DiT step (Ulysses 2 on 2 ranks, batch 2 = one CFG sample), hidden {args.hidden}, {args.heads} heads,"
        f" {args.layers} layers, {args.threads} thread(s) per rank, {args.reps} reps after warm-up"
    )
    columns = (
        ("step s", 8),
        ("step+guard s", 13),
        ("difference", 10),
        ("guard alone ms", 15),
        ("guard / step", 13),
        (f"per step, {args.steps} steps", 20),
    )
    print(f"{'tokens':>6} " + " ".join(f"{name:>{width}}" for name, width in columns))
    for tokens in args.tokens:
        r = run_on_ranks(2, _worker, args, tokens, threads=args.threads, timeout_s=1800)[0]
        step, guarded = statistics.median(r["without"]), statistics.median(r["with"])
        difference = statistics.median(w / o - 1 for w, o in zip(r["with"], r["without"]))  # adjacent pairs
        alone = statistics.median(r["alone"])
        print(
            f"{tokens:>6} {step:>8.4f} {guarded:>13.4f} {difference:>+9.2%} {alone * 1e3:>15.3f} {alone / step:>12.3%}"
            f" {alone / step / args.steps:>20.4%}"
        )


if __name__ == "__main__":
    main()
