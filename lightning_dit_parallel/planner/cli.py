"""``ldp-plan``: every valid layout of a model on some devices for some work, before anything is launched.

    ldp-plan CONFIG --devices 8 --memory 24GiB --dtype bfloat16 --height 720 --width 1280 --frames 81 [--json]

``CONFIG`` is a transformer ``config.json`` or a pipeline folder: every component its ``model_index.json`` names is
counted (``transformer``, ``transformer_2``, text encoders, image encoder, VAE, ControlNets), from the headers of its
safetensors files where present, else from its config (no weights are read). Prints a table (best first, the
recommendation marked ``*``) and the memory per rank by component, or, with ``--json``, a list with one object per
layout.
"""

from __future__ import annotations

import argparse
import sys

from lightning_dit_parallel.planner.layouts import Axes
from lightning_dit_parallel.planner.planner import plan_layouts
from lightning_dit_parallel.planner.report import describe_inputs, format_plan, plan_json
from lightning_dit_parallel.planner.work import DTYPE_BYTES


def _sequence(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(f"--sequence takes NAME=TOKENS, e.g. audio=128; got {text!r}")
    return name, int(count)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldp-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="transformer config.json, or a pipeline folder with transformer/config.json")
    g = p.add_argument_group("devices")
    g.add_argument("--devices", type=int, required=True, help="devices per node")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--memory", help="memory per device, e.g. 24GiB, 80GB (default 24GiB, or measured with --calibrate)")
    g.add_argument("--reserve", default="1GiB", help="memory per device kept free (default 1GiB)")
    g.add_argument("--flops", default="100TFLOPS", help="achieved matmul throughput per device (default 100TFLOPS)")
    g.add_argument("--bandwidth", default="25GB/s", help="device-to-device bandwidth in a node (default 25GB/s)")
    g.add_argument("--inter-node-bandwidth", default="12.5GB/s", help="bandwidth across nodes (default 12.5GB/s)")
    g.add_argument("--device-type", choices=("cuda", "cpu"), default="cuda")
    g.add_argument(
        "--host-bandwidth",
        default="25GB/s",
        help="bytes/s a device reads from pinned host memory, for --offload (default 25GB/s)",
    )
    g.add_argument(
        "--calibrate",
        action="store_true",
        help="measure compute and link bandwidth on this machine (and its memory unless --memory is given)",
    )
    w = p.add_argument_group("work")
    w.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    w.add_argument("--height", type=int)
    w.add_argument("--width", type=int)
    w.add_argument("--frames", type=int, help="output frames (video)")
    w.add_argument("--tokens", type=int, help="latent tokens per sample, instead of height/width/frames")
    w.add_argument("--text-tokens", type=int, default=512, help="text tokens (max_sequence_length, default 512)")
    w.add_argument(
        "--sequence",
        type=_sequence,
        action="append",
        default=[],
        metavar="NAME=TOKENS",
        help="tokens of a further cut sequence of the plan (e.g. audio=128)",
    )
    w.add_argument("--batch", type=int, default=1, help="samples per pipeline call (default 1)")
    w.add_argument("--samples", type=int, help="samples in all (default: the batch); data parallelism needs more")
    w.add_argument("--no-cfg", dest="cfg", action="store_false", help="classifier-free guidance off")
    w.add_argument(
        "--cfg-calls",
        choices=("doubled", "separate"),
        default="doubled",
        help="doubled: one DiT call on the doubled batch (CFG parallel applies); separate: two calls per"
        " step, as Wan's and QwenImage's pipelines make",
    )
    w.add_argument("--steps", type=int, default=50)
    o = p.add_argument_group("choice and output")
    o.add_argument("--allow-approximate", action="store_true", help="PipeFusion and DistriFusion may be recommended")
    o.add_argument(
        "--no-shard-text-encoder",
        dest="shard_text_encoders",
        action="store_false",
        help="with FSDP, keep the text and image encoders whole",
    )
    o.add_argument("--no-tp", action="store_true", help="leave tensor parallelism out")
    o.add_argument("--no-parallel-vae", action="store_true", help="leave parallel VAE decode out")
    o.add_argument(
        "--offload",
        action="store_true",
        help="when no layout fits, consider every layout with its weights in host memory (+offload)",
    )
    o.add_argument("--text-encoder-config", action="append", help="a text encoder config.json (repeatable)")
    o.add_argument("--vae-config", help="a VAE config.json")
    o.add_argument("--top", type=int, help="show only the best N layouts in the table")
    o.add_argument("--markdown", action="store_true", help="the table as Markdown")
    o.add_argument("--json", action="store_true", help="print a JSON list, one object per layout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    flops, bandwidth, memory = args.flops, args.bandwidth, args.memory
    notes = []
    if args.calibrate:
        import torch

        from lightning_dit_parallel.planner.calibrate import calibrate

        named = getattr(torch, args.dtype, None)
        dtype = named if isinstance(named, torch.dtype) else torch.float32  # "fp8" and other short names: float32
        measured = calibrate(dtype, args.devices)
        notes.append(measured.describe())
        flops = measured.flops
        bandwidth = measured.bandwidth or bandwidth
        if memory is None and measured.memory:
            memory = measured.memory
    memory = "24GiB" if memory is None else memory
    try:
        plan = plan_layouts(
            args.config,
            devices=args.devices,
            nodes=args.nodes,
            memory=memory,
            dtype=args.dtype,
            height=args.height,
            width=args.width,
            frames=args.frames,
            tokens=args.tokens,
            text_tokens=args.text_tokens,
            batch=args.batch,
            samples=args.samples,
            cfg=args.cfg,
            cfg_calls=args.cfg_calls,
            steps=args.steps,
            sequences=dict(args.sequence),
            flops=flops,
            bandwidth=bandwidth,
            inter_node_bandwidth=args.inter_node_bandwidth,
            reserve=args.reserve,
            device_type=args.device_type,
            host_bandwidth=args.host_bandwidth,
            allow_approximate=args.allow_approximate,
            shard_text_encoders=args.shard_text_encoders,
            axes=Axes(tp=not args.no_tp, parallel_vae=not args.no_parallel_vae, offload=args.offload),
            text_encoder_configs=args.text_encoder_config,
            vae_config=args.vae_config,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"ldp-plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(plan_json(plan))
        return 0
    print("\n".join([*notes, *describe_inputs(plan), ""]))
    print(format_plan(plan, top=args.top, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
