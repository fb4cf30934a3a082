"""The layout planner against measurements: parameter bytes per rank, bytes sent per DiT call and the activation peak.

For each layout the ranks are started once; on every rank a seeded DiT is parallelized, one forward is run as a
warm-up and one is measured: parameter bytes held (local shards, each storage once), bytes sent by kind
(``CommCounter`` plus DTensor's functional collectives) and the peak RSS growth of the forward (large blocks are
unmapped on free, so the growth measures what the forward allocates). The planner predicts the same three from the
model's structure (``lightning_dit_parallel.testing.measure.predict_call``); the table prints both and the relative
errors. Activations are compared as the planner's activations plus FSDP-gathered parameters and PipeFusion caches
against the measured growth (which also holds communication buffers and the allocator's slack).

A second table compares the VAE decode peak (one process) with the planner's estimate for an ``AutoencoderKL``
and an ``AutoencoderKLWan`` (causal, one latent frame at a time) of small widths.

    python bench/planner_calibration.py                     # every layout below, DiT / Flux / Wan shapes, VAEs
    python bench/planner_calibration.py --cases dit --layouts ulysses2 ring2 --skip-vae
"""

from __future__ import annotations

import argparse

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    WanTransformer3DModel,
)

from lightning_dit_parallel.planner.layouts import PlannedLayout
from lightning_dit_parallel.planner.spec import model_spec
from lightning_dit_parallel.planner.work import Work
from lightning_dit_parallel.registry import plan_for
from lightning_dit_parallel.testing.measure import measure_call, predict_call, relative_error
from lightning_dit_parallel.utils.multiprocess import run_on_ranks

MiB = 2**20

#: name -> PlannedLayout keyword arguments (the layouts the test suite runs).
LAYOUTS: dict[str, dict] = {
    "single": {},
    "ulysses2": dict(ulysses=2),
    "ring2": dict(ring=2),
    "cfg2": dict(cfg=2),
    "fsdp_dp2": dict(dp=2, fsdp=True),
    "fsdp_ulysses2": dict(ulysses=2, fsdp=True),
    "pp2": dict(pp=2, pp_mode="microbatch"),
    "pipefusion2": dict(pp=2, pp_mode="pipefusion", patches=4),
    "tp2": dict(tp=2),
    "usp2x2": dict(ring=2, ulysses=2),
    "ulysses4": dict(ulysses=4),
    "cfg2_ulysses2_fsdp": dict(cfg=2, ulysses=2, fsdp=True),
    "cfg2_pp2": dict(cfg=2, pp=2, pp_mode="microbatch"),
    "pp2_ulysses2_fsdp": dict(pp=2, ulysses=2, fsdp=True, pp_mode="microbatch"),
    "dp2_ring2": dict(dp=2, ring=2),
    "tp2_ulysses2": dict(tp=2, ulysses=2),
}
DEFAULT_LAYOUTS = (
    "single",
    "ulysses2",
    "ring2",
    "cfg2",
    "fsdp_ulysses2",
    "pp2",
    "pipefusion2",
    "tp2",
    "usp2x2",
    "cfg2_ulysses2_fsdp",
)


def dit_case(tokens: int):
    side = int(round(tokens**0.5))
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=2 * side,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 2 * side, 2 * side, generator=g),
        timestep=torch.full((2,), 5),
        class_labels=torch.tensor([1, 10]),
        return_dict=False,
    )
    return model, inputs, Work(tokens=side * side, batch=1, text_tokens=0)


def flux_case(tokens: int):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=(16, 24, 24),
    ).eval()
    g = torch.Generator().manual_seed(1)
    text = 64
    inputs = dict(
        hidden_states=torch.randn(2, tokens, 16, generator=g),
        encoder_hidden_states=torch.randn(2, text, 64, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.full((2,), 0.5),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )
    return model, inputs, Work(tokens=tokens, batch=1, text_tokens=text)


def wan_case(tokens: int):
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        text_dim=64,
        freq_dim=32,
        ffn_dim=512,
        num_layers=4,
        rope_max_seq_len=64,
    ).eval()
    frames, side = 4, int(round((tokens / 4) ** 0.5))
    g = torch.Generator().manual_seed(1)
    text = 32
    inputs = dict(
        hidden_states=torch.randn(2, 4, frames, 2 * side, 2 * side, generator=g),
        timestep=torch.full((2,), 5),
        encoder_hidden_states=torch.randn(2, text, 64, generator=g),
        return_dict=False,
    )
    return model, inputs, Work(tokens=frames * side * side, batch=1, text_tokens=text)


CASES = {"dit": dit_case, "flux": flux_case, "wan": wan_case}


def _return_freed_memory() -> None:
    """glibc: mmap (and unmap on free) every block of 64 KiB or more, so the RSS follows what is allocated."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, case: str, layout_kwargs: dict, tokens: int) -> dict:
    _return_freed_memory()
    model, inputs, work = CASES[case](tokens)
    layout = PlannedLayout(**layout_kwargs)
    predicted = predict_call(model_spec(model, plan_for(model)), work, layout, element=4)
    if layout.world_size == 1:
        from lightning_dit_parallel.utils.memory import current_rss, peak_rss, reset_peak_rss, resident_bytes

        with torch.no_grad():
            model(**inputs)
            reset_peak_rss()
            before = current_rss()
            model(**inputs)
            growth = peak_rss() - before
        measured = {"parameter_bytes": resident_bytes(model, buffers=False), "bytes_sent": {}, "peak_growth": growth}
    else:
        measured = measure_call(model, inputs, layout, memory=True, warmup=1)
    return {"predicted": predicted, "measured": measured}


def _vae_worker(rank: int, world: int, kind: str, size: tuple[int, int, int]) -> tuple[int, int]:
    """``(measured, predicted)`` decode peak of one latent of ``size`` (frames, rows, columns)."""
    from lightning_dit_parallel.planner.components import vae_spec
    from lightning_dit_parallel.planner.memory import vae_bytes
    from lightning_dit_parallel.planner.tokens import LatentGrid
    from lightning_dit_parallel.utils.memory import current_rss, peak_rss, reset_peak_rss

    _return_freed_memory()
    torch.manual_seed(0)
    frames, rows, cols = size
    if kind == "AutoencoderKLWan":
        vae = AutoencoderKLWan(base_dim=32, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()
        latent = torch.randn(1, 4, frames, rows, cols)
    else:
        vae = AutoencoderKL(
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=16,
            layers_per_block=1,
        ).eval()
        latent = torch.randn(1, 4, rows, cols)
    spec = vae_spec(vae)
    with torch.no_grad():
        vae.decode(latent)
        reset_peak_rss()
        before = current_rss()
        vae.decode(latent)
        growth = peak_rss() - before
    grid = LatentGrid(frames, rows, cols, 0, spec.spatial, spec.temporal, spec.latent_channels, (1, 1, 1))
    _, predicted = vae_bytes(spec, grid, Work(tokens=1, batch=1), PlannedLayout(), 4)
    return growth, predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--layouts", nargs="*", default=list(DEFAULT_LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--tokens", type=int, default=1024, help="latent tokens (a square for DiT, 4 x square for Wan)")
    parser.add_argument("--skip-vae", action="store_true")
    args = parser.parse_args()
    print(f"float32, batch 2 rows, {args.tokens} latent tokens; errors are |predicted - measured| / measured")
    print(
        f"{'case':5} {'layout':20} {'params/rank KiB':>22} {'err':>6} {'bytes/call KiB':>22} {'err':>6}"
        f" {'activation peak MiB':>22} {'err':>6}"
    )
    for case in args.cases:
        for name in args.layouts:
            layout = PlannedLayout(**LAYOUTS[name])
            results = run_on_ranks(layout.world_size, _worker, case, LAYOUTS[name], args.tokens, timeout_s=900)
            p = results[0]["predicted"]
            params = max(r["measured"]["parameter_bytes"] for r in results)
            kinds = set(p.bytes_sent) | {k for r in results for k in r["measured"]["bytes_sent"]}
            sent = sum(max(r["measured"]["bytes_sent"].get(k, 0) for r in results) for k in kinds)
            peak = max(r["measured"]["peak_growth"] for r in results)
            act = p.forward_peak_bytes
            print(
                f"{case:5} {name:20} {p.parameter_bytes / 1024:>10.1f} / {params / 1024:>9.1f}"
                f" {relative_error(p.parameter_bytes, params):>6.3f}"
                f" {sum(p.bytes_sent.values()) / 1024:>10.1f} / {sent / 1024:>9.1f}"
                f" {relative_error(sum(p.bytes_sent.values()), sent):>6.3f}"
                f" {act / MiB:>10.2f} / {peak / MiB:>9.2f} {relative_error(act, peak):>6.3f}"
            )

    if args.skip_vae:
        return
    print("\nVAE decode peak, one process, float32 (latent frames x rows x columns -> decoded):")
    for kind, size in (
        ("AutoencoderKL", (1, 32, 32)),
        ("AutoencoderKL", (1, 64, 64)),
        ("AutoencoderKLWan", (3, 32, 32)),
        ("AutoencoderKLWan", (5, 32, 48)),
    ):
        measured, predicted = run_on_ranks(1, _vae_worker, kind, size, timeout_s=900)[0]
        print(
            f"  {kind:17} {'x'.join(map(str, size)):8} predicted {predicted / MiB:8.1f} MiB, measured"
            f" {measured / MiB:8.1f} MiB, error {relative_error(predicted, measured):.3f}"
        )


if __name__ == "__main__":
    main()
