"""Peak memory per rank over a whole ``ldp-predict model=pipeline`` run of a saved pipeline, against one process.

The user's path: a ``WanPipeline`` saved with ``save_pretrained`` (a transformer with Wan 2.1 1.3B's width, dim
1536, 12 heads, ffn 8960, and a UMT5 encoder; about 1.7 GB of float32 weights by default) loaded by
``ldp-predict model=pipeline model.path=DIR``, 4 prompts, 2 steps. Every rank process records its peak
(``VmHWM``) over the whole run, teardown included, and two baselines (``bench/peak_run.py``): the resident bytes
after the libraries are imported (``imports``), and right before the pipeline's components are loaded (``before
loading``: the libraries, with the modules of the classes the pipeline folder names, plus Hydra's configuration,
the prompts and the output writer). The table gives, per layout, the largest rank's peak, the same net of each
baseline, and each net figure divided by the one-process run's, next to ``ldp-plan``'s estimate of the memory per
rank for the same layout, compared with both net figures (the planner counts the model's memory: the components'
parameters and the largest phase, not what a process holds besides them).

    python bench/memory.py                      # 1, 2 and 4 ranks; about 5 minutes on 2 cores
    python bench/memory.py --layers 2 --quick   # a smaller model, 2 ranks only
    python bench/memory.py --configure-model    # the pipeline loaded in the module's configure_model
    python bench/memory.py --layers 30          # Wan 2.1 1.3B's depth too (5.7 GB of float32 weights)
    python bench/memory.py --text-vocab 131072  # a token table of 0.5 GB (UMT5-XXL's is 256384 x 4096)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9

#: (name, ranks, ldp-predict overrides, the planner's layout fields)
LAYOUTS = [
    ("one process", 1, ["strategy=none"], {}),
    ("ulysses 2 (replicated)", 2, ["strategy=ulysses", "strategy.ulysses_degree=2"], dict(ulysses=2)),
    ("fsdp (dp 2)", 2, ["strategy=fsdp"], dict(dp=2, fsdp=True, fsdp_units="rows")),
    (
        "fsdp x ulysses 2",
        2,
        ["strategy=fsdp", "strategy.ulysses_degree=2", "strategy.dp_degree=1"],
        dict(ulysses=2, fsdp=True, fsdp_units="rows"),
    ),
    (
        "fsdp (dp 2), layer units",
        2,
        ["strategy=fsdp", "strategy.fsdp_units=layers"],
        dict(dp=2, fsdp=True, fsdp_units="layers"),
    ),
    ("fsdp (dp 2), block units", 2, ["strategy=fsdp", "strategy.fsdp_units=blocks"], dict(dp=2, fsdp=True)),
    ("pipeline 2", 2, ["strategy=pipeline"], dict(pp=2, pp_mode="microbatch")),
    ("tp 2", 2, ["strategy=tp", "strategy.tp_degree=2"], dict(tp=2)),
    ("fsdp (dp 4)", 4, ["strategy=fsdp"], dict(dp=4, fsdp=True, fsdp_units="rows")),
    (
        "fsdp (dp 4), layer units",
        4,
        ["strategy=fsdp", "strategy.fsdp_units=layers"],
        dict(dp=4, fsdp=True, fsdp_units="layers"),
    ),
    ("fsdp (dp 4), block units", 4, ["strategy=fsdp", "strategy.fsdp_units=blocks"], dict(dp=4, fsdp=True)),
    (
        "fsdp x ulysses 2 x dp 2",
        4,
        ["strategy=fsdp", "strategy.ulysses_degree=2", "strategy.dp_degree=2"],
        dict(dp=2, ulysses=2, fsdp=True, fsdp_units="rows"),
    ),
    ("pipeline 4", 4, ["strategy=pipeline"], dict(pp=4, pp_mode="microbatch")),
    ("tp 4", 4, ["strategy=tp", "strategy.tp_degree=4"], dict(tp=4)),
    (
        "pipeline 2 x ulysses 2, fsdp",
        4,
        ["strategy=hybrid", "strategy.pp_degree=2", "strategy.cfg_degree=1", "strategy.ulysses_degree=2"],
        dict(pp=2, ulysses=2, fsdp=True, pp_mode="microbatch", fsdp_units="rows"),
    ),
]


def build_pipeline(
    folder: Path, layers: int, dim: int, heads: int, ffn: int, text_dim: int, text_layers: int, text_vocab: int = 0
) -> None:
    """A seeded WanPipeline of the given width saved to ``folder`` (skipped when it is there already); UMT5's token
    table has ``text_vocab`` rows (0: the word tokenizer's vocabulary; the prompts use its ids either way)."""
    if (folder / "model_index.json").is_file():
        return
    code = f"""
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel
from tests.pipelines import WORDS, tiny_wan_vae, word_tokenizer
torch.manual_seed(0)
transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads={heads},
    attention_head_dim={dim // heads}, in_channels=4, out_channels=4, text_dim={text_dim}, freq_dim=256, ffn_dim={ffn},
    num_layers={layers}, cross_attn_norm=True, rope_max_seq_len=64).eval()
encoder = UMT5EncoderModel(UMT5Config(vocab_size={text_vocab} or len(WORDS) + 3, d_model={text_dim}, d_kv=64,
    d_ff={text_dim * 2}, num_layers={text_layers}, num_heads={text_dim // 64}, relative_attention_num_buckets=8,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
pipe = WanPipeline(tokenizer=word_tokenizer(), text_encoder=encoder, vae=tiny_wan_vae(0), transformer=transformer,
    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
pipe.save_pretrained({str(folder)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def run(
    folder: Path, ranks: int, overrides: list[str], mmap_threshold: int | None = None, trace: bool = False
) -> list[dict]:
    """One ``ldp-predict`` run; the memory record of every rank."""
    with tempfile.TemporaryDirectory() as peaks, tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            str(ROOT / "bench" / "peak_run.py"),
            "model=pipeline",
            f"model.path={folder}",
            "data=prompts",
            "data.prompts=[a red cat,a blue dog,a green bird,a big dog]",
            "model.call.num_inference_steps=2",
            "model.call.height=64",
            "model.call.width=64",
            "model.call.num_frames=5",
            "+model.call.guidance_scale=4.0",
            f"trainer.devices={ranks}",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={out}",
            *overrides,
        ]
        env = {**os.environ, "LDP_PEAK_DIR": peaks, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if trace:
            env["LDP_MEMORY_TRACE"] = "1"
        if mmap_threshold is not None:  # glibc: tensors above it are mapped and unmapped, never kept in the heap
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(overrides)} on {ranks} ranks failed:\n{done.stderr[-3000:]}")
        records = [json.loads(p.read_text()) for p in sorted(Path(peaks).glob("rank*.json"))]
    if len(records) != ranks:
        raise RuntimeError(f"{len(records)} of {ranks} ranks reported their memory.")
    return records


def planned_bytes(folder: Path, ranks: int, fields: dict) -> float | None:
    """``ldp-plan``'s peak memory per rank for this layout and work (weights, activations, gathered layers; not the
    interpreter), or ``None`` where the planner does not list the layout."""
    from lightning_dit_parallel.planner.layouts import Axes
    from lightning_dit_parallel.planner.planner import plan_layouts

    plan = plan_layouts(
        folder,
        devices=ranks,
        memory="1TiB",
        dtype="float32",
        height=64,
        width=64,
        frames=5,
        batch=1,
        samples=4,
        cfg=True,
        cfg_calls="separate",
        steps=2,
        device_type="cpu",
        axes=Axes(fsdp_layers=True),
    )
    for estimate in plan.layouts:
        layout = estimate.layout
        if all(getattr(layout, k) == v for k, v in fields.items()) and all(
            getattr(layout, k) in (1, False, "none", 0, "blocks")
            for k in ("dp", "cfg", "pp", "ring", "ulysses", "tp", "fsdp", "parallel_vae", "fsdp_units")
            if k not in fields
        ):
            return estimate.memory.peak
    return None


def print_trace(records: list[dict]) -> None:
    """Every rank's resident memory and peak (MB) at each moment of its run, net of its baseline."""
    for record in records:
        base = record["baseline"]
        print(f"  rank {record['rank']}: baseline {base / 1e6:.0f} MB (moment: resident / peak, MB net of it)")
        for moment, rss, hwm in record["trace"]:
            print(f"    {moment:45s} {(rss - base) / 1e6:8.0f} {(hwm - base) / 1e6:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "ldp-bench-memory-wan")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--text-dim", type=int, default=1024)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument(
        "--text-vocab",
        type=int,
        default=0,
        help="rows of UMT5's token table (UMT5-XXL: 256384; default: the test tokenizer's few words)",
    )
    parser.add_argument("--quick", action="store_true", help="2 ranks only")
    parser.add_argument(
        "--configure-model",
        action="store_true",
        help="load the pipeline with DiffusionPipeline.from_pretrained in the module's configure_model"
        " (bench/peak_run.py ConfigureModelSampler) instead of model=pipeline's own loading",
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only the layouts of these names")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="print every rank's resident memory and peak at each moment of the run (bench/peak_run.py)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="glibc's MALLOC_MMAP_THRESHOLD_ for every process (e.g. 65536). By default glibc raises"
        " its threshold after the first large free, and memory freed by a step can then stay in"
        " the heap, counted in the resident set although free (GPUs use PyTorch's caching"
        " allocator instead)",
    )
    args = parser.parse_args()
    vocab = f"-vocab{args.text_vocab}" if args.text_vocab else ""
    folder = args.folder.with_name(f"{args.folder.name}-{args.layers}x{args.dim}{vocab}")
    text = (args.text_dim, args.text_layers, args.text_vocab)
    build_pipeline(folder, args.layers, args.dim, args.heads, args.ffn, *text)
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    print(f"pipeline {folder}: {weights / GB:.2f} GB of safetensors; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}")
    layouts = [
        entry
        for entry in LAYOUTS
        if not (args.quick and entry[1] > 2)
        and (args.only is None or entry[0] in args.only or entry[0] == "one process")
    ]
    reference = reference_loaded = None
    print(
        "| layout | ranks | peak per rank (GB) | net of imports (GB) | net / one process | net of before loading (GB) |"
        " net / one process | planned (GB) | planned / net of imports | planned / net of before loading |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    if args.configure_model:
        print("loaded in configure_model: model._target_=__main__.ConfigureModelSampler")
    for name, ranks, overrides, fields in layouts:
        if args.configure_model:
            overrides = [*overrides, "model._target_=__main__.ConfigureModelSampler"]
        records = run(folder, ranks, overrides, args.mmap_threshold, args.trace)
        worst = max(records, key=lambda r: r["peak"] - r["baseline"])
        net = worst["peak"] - worst["baseline"]
        reference = reference or net
        # the same net of what each rank held right before loading
        net_loaded = max(r["peak"] - r["before_load"] for r in records)
        reference_loaded = reference_loaded or net_loaded
        planned = planned_bytes(folder, ranks, fields)
        planned_text = (
            "- | - | -" if planned is None else f"{planned / GB:.2f} | {planned / net:.2f} | {planned / net_loaded:.2f}"
        )
        cuda = "" if worst["cuda_peak"] is None else f" (device {worst['cuda_peak'] / GB:.2f})"
        print(
            f"| {name} | {ranks} | {worst['peak'] / GB:.2f}{cuda} | {net / GB:.2f} | **{net / reference:.2f}** |"
            f" {net_loaded / GB:.2f} | **{net_loaded / reference_loaded:.3f}** | {planned_text} |",
            flush=True,
        )
        if args.trace:
            print_trace(records)


if __name__ == "__main__":
    main()
