"""The planner's output: a readable table (``format_plan``) or JSON for tools (``plan_json``)."""

from __future__ import annotations

import json

from lightning_dit_parallel.planner.planner import LayoutEstimate, Plan

GiB = 2**30
GB = 1e9

_COLUMNS = (
    ("layout", 34), ("exact", 5), ("DiT", 6), ("+gathered", 9), ("activ.", 6), ("cache", 6), ("text enc.", 9),
    ("VAE", 6), ("peak GiB", 8), ("fits", 4), ("a2a GB", 7), ("p2p GB", 7), ("all-gather GB", 13),
    ("all-reduce GB", 13), ("bcast GB", 8), ("s/step", 7), ("total s", 8),
)


def describe_inputs(plan: Plan) -> list[str]:
    """Header lines: the model, its tokens, the devices and the assumptions."""
    spec, grid, work, hw = plan.models.dit, plan.grid, plan.work, plan.hardware
    from lightning_dit_parallel.planner.work import dtype_bytes

    element = dtype_bytes(plan.dtype)
    lines = [
        f"model:   {spec.name}, {spec.numel / 1e9:.2f} B parameters ({spec.numel * element / GiB:.1f} GiB in"
        f" {plan.dtype}), {spec.num_blocks} blocks, heads {list(spec.head_counts())}; from {plan.models.source}",
    ]
    for enc in plan.models.text_encoders:
        lines.append(f"         {enc.name}: {enc.cls}, {enc.numel / 1e9:.2f} B parameters"
                     f" ({enc.numel * element / GiB:.1f} GiB)")
    if plan.models.vae is not None:
        vae = plan.models.vae
        lines.append(f"         vae: {vae.cls}, {vae.numel / 1e6:.0f} M parameters, {vae.spatial}x spatial,"
                     f" {vae.temporal}x temporal")
    if work.tokens is not None:
        size = f"{work.tokens} tokens"
    else:
        size = f"{work.width}x{work.height}" + (f"x{work.frames}" if work.frames else "")
    cfg = "off" if not work.cfg else f"on ({work.cfg_calls} batch)" if work.cfg_calls == "doubled" else "on (2 calls)"
    lines.append(
        f"work:    {size}: latent {grid.frames}x{grid.height}x{grid.width}, {grid.tokens} tokens"
        f" (+{work.text_tokens} text); batch {work.batch}, {work.total_samples} sample(s), CFG {cfg},"
        f" {work.steps} steps"
    )
    lines.append(
        f"devices: {hw.nodes} x {hw.devices} {hw.device_type}, {hw.memory / GiB:.1f} GiB each"
        f" ({hw.usable_memory / GiB:.1f} usable), {hw.flops / 1e12:.3g} TFLOP/s, {hw.bandwidth / GB:.3g} GB/s in a node"
        + (f", {hw.inter_node_bandwidth / GB:.3g} GB/s across nodes" if hw.nodes > 1 else "")
    )
    return lines


def _row(e: LayoutEstimate) -> list[str]:
    m, b, t = e.memory, e.bytes_per_step, e.time

    def gib(n: int) -> str:
        return f"{n / GiB:.2f}" if n else "-"

    def gb(kind: str) -> str:
        n = b.get(kind, 0)
        return f"{n / GB:.3g}" if n else "-"

    name = e.layout.describe() + (" *" if e.recommended else "")
    return [
        name, "yes" if e.exact else "no", gib(m.dit_parameters), gib(m.dit_gathered), gib(m.activations),
        gib(m.caches), gib(m.text_encoder_parameters + m.text_encoder_peak),
        gib(m.vae_parameters + m.vae_decode_peak), f"{m.peak / GiB:.1f}", "yes" if e.fits else "no",
        gb("all_to_all"), gb("p2p"), gb("all_gather"), gb("all_reduce"), gb("broadcast"), f"{t.step_s:.3g}",
        f"{t.total_s:.4g}",
    ]


def format_plan(plan: Plan, top: int | None = None, markdown: bool = False) -> str:
    """The plan as a table, best first; ``top`` keeps the first rows (the recommended one always shows)."""
    rows = list(plan.layouts)
    if top is not None and len(rows) > top:
        kept = rows[:top]
        rec = plan.recommended
        if rec is not None and rec not in kept:
            kept.append(rec)
        rows = kept
    header = [name for name, _ in _COLUMNS]
    body = [_row(e) for e in rows]
    if markdown:
        rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
        lines = ["| " + " | ".join(header) + " |", rule]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    else:
        widths = [max(w, len(h), *(len(r[i]) for r in body)) for i, (h, w) in enumerate(_COLUMNS)]
        def fmt(row: list[str]) -> str:
            return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))

        lines = [fmt(header)] + [fmt(r) for r in body]
    lines.append("")
    lines.append(
        "Memory per rank in GiB: DiT parameters held, +gathered by FSDP during a step, activations (attention"
        " included), PipeFusion/DistriFusion caches, text encoders (held + encoding peak), VAE (parameters + decode"
        " peak); peak = everything held + the largest phase. Bytes per denoising step in GB sent by the busiest rank,"
        " by kind. Times are estimates from the compute and bandwidth above."
    )
    rec = plan.recommended
    if rec is not None:
        lines.append(f"recommended: {rec.layout.describe()} -- {rec.reason}")
    else:
        smallest = min(plan.layouts, key=lambda e: e.memory.peak)
        lines.append(
            f"nothing fits in {plan.hardware.usable_memory / GiB:.1f} GiB usable per device; the smallest peak is"
            f" {smallest.memory.peak / GiB:.1f} GiB ({smallest.layout.describe()}). More devices, a lower resolution or"
            " fewer frames, FSDP over the text encoder, a parallel VAE or CPU offload of the text encoder would help."
        )
    shown = f"{len(rows)} of {len(plan.layouts)} valid layouts" if len(rows) < len(plan.layouts) else (
        f"{len(plan.layouts)} valid layouts")
    lines.append(f"({shown}; '*' marks the recommendation)")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    """A JSON list with one object per layout (``LayoutEstimate.as_json``)."""
    return json.dumps([e.as_json() for e in plan.layouts], indent=1)
