"""The planner's output: a readable table (``format_plan``) or JSON for tools (``plan_json``)."""

from __future__ import annotations

import json

from lightning_dit_parallel.planner.planner import LayoutEstimate, Plan

GiB = 2**30
GB = 1e9

_COLUMNS = (
    ("layout", 34),
    ("exact", 5),
    ("DiT", 6),
    ("+gathered", 9),
    ("activ.", 6),
    ("cache", 6),
    ("text enc.", 9),
    ("img enc.", 8),
    ("other", 6),
    ("VAE", 6),
    ("peak GiB", 8),
    ("fits", 4),
    ("a2a GB", 7),
    ("p2p GB", 7),
    ("all-gather GB", 13),
    ("all-reduce GB", 13),
    ("bcast GB", 8),
    ("s/step", 7),
    ("total s", 8),
)


def describe_inputs(plan: Plan) -> list[str]:
    """Header lines: the models (every component, with how it was counted), their tokens, the devices and the
    assumptions."""
    models, grid, work, hw = plan.models, plan.grid, plan.work, plan.hardware
    spec = models.dit
    from lightning_dit_parallel.planner.work import dtype_bytes

    element = dtype_bytes(plan.dtype)
    counted = dict(models.counted_from)

    def how(name: str) -> str:
        return f"; counted from {counted[name]}" if name in counted else ""

    dits = models.dits
    lines = [
        f"model:   {spec.name}, {spec.numel / 1e9:.2f} B parameters ({spec.numel * element / GiB:.1f} GiB in"
        f" {plan.dtype}), {spec.num_blocks} blocks, heads {list(spec.head_counts())}; from {models.source}",
    ]
    if len(dits) > 1:
        for name, dit in dits:
            lines.append(
                f"         {name}: {dit.name}, {dit.numel / 1e9:.2f} B parameters"
                f" ({dit.numel * element / GiB:.1f} GiB){how(name)}"
            )
    elif dits[0][0] in counted:
        lines[0] += f", counted from {counted[dits[0][0]]}"
    for enc in models.encoders:
        tokens = f", {enc.max_tokens} tokens per image" if enc.kind == "image" and enc.max_tokens else ""
        lines.append(
            f"         {enc.name}: {enc.cls}, {enc.numel / 1e9:.2f} B parameters"
            f" ({enc.numel * element / GiB:.1f} GiB){tokens}{how(enc.name)}"
        )
    if models.vae is not None:
        vae = models.vae
        lines.append(
            f"         vae: {vae.cls}, {vae.numel / 1e6:.0f} M parameters, {vae.spatial}x spatial,"
            f" {vae.temporal}x temporal{how('vae')}"
        )
    for other in models.others:
        lines.append(
            f"         {other.name}: {other.cls}, {other.numel / 1e9:.2f} B parameters"
            f" ({other.numel * element / GiB:.1f} GiB), held whole{how(other.name)}"
        )
    for note in models.notes:
        lines.append(f"  note:  {note}")
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


def _row(e: LayoutEstimate) -> dict[str, str]:
    m, b, t = e.memory, e.bytes_per_step, e.time

    def gib(n: int) -> str:
        return f"{n / GiB:.2f}" if n else "-"

    def gb(kind: str) -> str:
        n = b.get(kind, 0)
        return f"{n / GB:.3g}" if n else "-"

    name = e.layout.describe() + (" *" if e.recommended else "")
    return {
        "layout": name,
        "exact": "yes" if e.exact else "no",
        "DiT": gib(m.dit_parameters),
        "+gathered": gib(m.dit_gathered),
        "activ.": gib(m.activations),
        "cache": gib(m.caches),
        "text enc.": gib(m.text_encoder_parameters + m.text_encoder_peak),
        "img enc.": gib(m.image_encoder_parameters + m.image_encoder_peak),
        "other": gib(m.other_parameters),
        "VAE": gib(m.vae_parameters + m.vae_decode_peak),
        "peak GiB": f"{m.peak / GiB:.1f}",
        "fits": "yes" if e.fits else "no",
        "a2a GB": gb("all_to_all"),
        "p2p GB": gb("p2p"),
        "all-gather GB": gb("all_gather"),
        "all-reduce GB": gb("all_reduce"),
        "bcast GB": gb("broadcast"),
        "s/step": f"{t.step_s:.3g}",
        "total s": f"{t.total_s:.4g}",
    }


def component_lines(plan: Plan, e: LayoutEstimate) -> list[str]:
    """Memory one rank of ``e`` needs, component by component: parameters held (and how each is cut), then what the
    largest phase adds."""
    m, lay = e.memory, e.layout
    shards = lay.shard_degree
    dit_names = {name for name, _ in plan.models.dits}
    encoders = {enc.name: enc.numel * _element(plan) for enc in plan.models.encoders}

    def cut(name: str, held: int) -> str:
        if name in dit_names:
            parts = [
                f"1/{shards} FSDP shard" if shards > 1 else "",
                f"stage of 1/{lay.pp} of the blocks" if lay.pp > 1 else "",
                f"1/{lay.tp} of the split layers" if lay.tp > 1 else "",
                "the root only: the blocks in host memory" if lay.offload else "",
            ]
            return ", ".join(p for p in parts if p) or "whole"
        if name in encoders and lay.offload:
            return "the root only: the layers in host memory"
        if name in encoders and shards > 1 and held < encoders[name]:
            return f"1/{shards} FSDP shard"
        return "whole"

    lines = [f"memory per rank by component, {lay.describe()}:"]
    for name, n in m.components:
        lines.append(f"  {name:<16} {n / GiB:7.2f} GiB  parameters ({cut(name, n)})")
    phases = m.phases
    extra = {
        "denoising": (
            f"{'brought from the host' if lay.offload else 'FSDP-gathered'} {m.dit_gathered / GiB:.2f}, "
            if m.dit_gathered
            else ""
        )
        + f"activations {m.activations / GiB:.2f}"
        + (f", caches {m.caches / GiB:.2f}" if m.caches else ""),
        "text encoding": "gathered layers and activations of the largest text encoder",
        "image encoding": "gathered layers and activations of the image encoder",
        "decoding": "VAE decode activations and the decoded output",
    }
    for phase, n in phases.items():
        if n:
            lines.append(f"  {phase:<16} {n / GiB:7.2f} GiB  while it runs ({extra[phase]})")
    lines.append(
        f"  {'peak':<16} {m.peak / GiB:7.2f} GiB  = {m.resident / GiB:.2f} GiB of parameters held +"
        f" {m.peak_phase} {phases[m.peak_phase] / GiB:.2f} GiB"
    )
    if m.host_parameters:
        lines.append(
            f"  {'host memory':<16} {m.host_parameters / GiB:7.2f} GiB  offloaded parameters (pinned, streamed"
            " to the device per unit; not in the peak)"
        )
    return lines


def _element(plan: Plan) -> int:
    from lightning_dit_parallel.planner.work import dtype_bytes

    return dtype_bytes(plan.dtype)


def format_plan(plan: Plan, top: int | None = None, markdown: bool = False) -> str:
    """The plan as a table, best first; ``top`` keeps the first rows (the recommended one always shows)."""
    rows = list(plan.layouts)
    if top is not None and len(rows) > top:
        kept = rows[:top]
        rec = plan.recommended
        if rec is not None and rec not in kept:
            kept.append(rec)
        rows = kept
    models = plan.models
    skip = {"img enc."} if not models.image_encoders else set()
    skip |= {"other"} if not models.others else set()
    columns = [(name, width) for name, width in _COLUMNS if name not in skip]
    header = [name for name, _ in columns]
    body = [[r[name] for name in header] for r in map(_row, rows)]
    if markdown:
        rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
        lines = ["| " + " | ".join(header) + " |", rule]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    else:
        widths = [max(w, len(h), *(len(r[i]) for r in body)) for i, (h, w) in enumerate(columns)]

        def fmt(row: list[str]) -> str:
            return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))

        lines = [fmt(header)] + [fmt(r) for r in body]
    lines.append("")
    dits = (
        "DiT parameters held (every transformer of the pipeline)" if len(models.dits) > 1 else ("DiT parameters held")
    )
    lines.append(
        f"Memory per rank in GiB: {dits}, +gathered by FSDP during a step, activations (attention"
        " included), PipeFusion/DistriFusion caches, text encoders (held + encoding peak)"
        + (", image encoders (held + encoding peak)" if models.image_encoders else "")
        + (", other components held whole" if models.others else "")
        + ", VAE (parameters + decode peak); peak = everything held + the largest phase. Bytes per denoising step in"
        " GB sent by the busiest rank, by kind. Times are estimates from the compute and bandwidth above."
    )
    rec = plan.recommended
    if rec is not None:
        lines.append("")
        lines += component_lines(plan, rec)
        lines.append("")
        lines.append(f"recommended: {rec.layout.describe()} -- {rec.reason}")
    else:
        smallest = min(plan.layouts, key=lambda e: e.memory.peak)
        lines.append("")
        lines += component_lines(plan, smallest)
        lines.append("")
        lines.append(
            f"nothing fits in {plan.hardware.usable_memory / GiB:.1f} GiB usable per device; the smallest peak is"
            f" {smallest.memory.peak / GiB:.1f} GiB ({smallest.layout.describe()}). More devices, a lower resolution or"
            " fewer frames, FSDP over the text encoder, a parallel VAE or CPU offload of the text encoder would help."
        )
    shown = (
        f"{len(rows)} of {len(plan.layouts)} valid layouts"
        if len(rows) < len(plan.layouts)
        else (f"{len(plan.layouts)} valid layouts")
    )
    lines.append(f"({shown}; '*' marks the recommendation)")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    """A JSON list with one object per layout (``LayoutEstimate.as_json``)."""
    return json.dumps([e.as_json() for e in plan.layouts], indent=1)
