"""Runs ``ldp-predict`` with its arguments and, at exit, writes this process' memory to ``$LDP_PEAK_DIR``.

``bench/memory.py`` starts it; Lightning's launcher re-runs the same command for the other ranks, so every rank
records:

- ``baseline``: resident bytes after the interpreter and libraries are imported, before anything else;
- ``before_load``: resident bytes right before the pipeline's components are loaded (``load_pipeline`` in
  ``PipelineSampler``: the first read of the folder), i.e. what the process held before loading: the interpreter,
  the libraries (with the modules of the classes ``model_index.json`` names, which diffusers and transformers
  import lazily inside ``from_pretrained``: imported here first), Hydra's configuration, the prompts and the output
  writer;
- ``peak``: ``VmHWM``, the peak over the whole run, teardown included;
- ``cuda_peak``: on a GPU, ``torch.cuda.max_memory_allocated``.

``model._target_=__main__.ConfigureModelSampler`` runs the other way users load a model larger than one device: the
``PipelineSampler`` of ``model=pipeline`` with its pipeline loaded by plain ``DiffusionPipeline.from_pretrained`` in
Lightning's ``configure_model`` hook (``before_load`` is then taken as that hook starts).

With ``LDP_MEMORY_TRACE=1`` every rank also records ``trace``: ``(moment, resident bytes, VmHWM)`` at the moments of
a run (loading, process group, parallelize, reading the weights, text encode, every DiT call, VAE decode, teardown),
found by wrapping those functions from here (the package is unchanged): where each part of the peak comes from.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
from pathlib import Path

import diffusers  # (imported before the baseline: libraries are not the model)
import lightning as L
import torch
import transformers  # noqa: F401

import lightning_dit_parallel.app.cli as cli
from lightning_dit_parallel.app.sampling import PipelineSampler
from lightning_dit_parallel.utils.memory import current_rss, peak_rss

BASELINE = current_rss()


class ConfigureModelSampler(PipelineSampler):
    """``PipelineSampler`` whose pipeline a user's ``configure_model`` loads: ``from_pretrained(path)`` there, under the
    strategy's ``model_sharded_context`` (which makes it lean), instead of the sampler's own loading."""

    def __init__(self, path, torch_dtype=None, variant=None, pipeline_class=None, call=None, seed=0) -> None:
        L.LightningModule.__init__(self)
        if torch_dtype is not None or variant is not None or pipeline_class is not None:
            raise ValueError("ConfigureModelSampler loads the folder as saved (no torch_dtype, variant, class).")
        self.path, self.pipe = path, None
        self.call = {k: v for k, v in dict(call or {}).items() if v is not None}
        self.seed = int(seed)

    def configure_model(self) -> None:
        if self.pipe is None:
            if not BEFORE_LOAD:
                _import_classes(Path(self.path))
                BEFORE_LOAD.append(current_rss())
            mark("load start")
            self.pipe = diffusers.DiffusionPipeline.from_pretrained(self.path)
            self.pipe.set_progress_bar_config(disable=True)
            mark("load end")


BEFORE_LOAD: list[int] = []
TRACE: list[tuple[str, int, int]] = []


def mark(moment: str) -> None:
    """Note this process' resident bytes and peak now (with ``LDP_MEMORY_TRACE=1``)."""
    if os.environ.get("LDP_MEMORY_TRACE"):
        TRACE.append((moment, current_rss(), peak_rss()))


def _wrap(owner: object, name: str, label: str, every: int = 1) -> None:
    """Mark before and after each call of ``owner.name`` (only the first ``every`` calls after the first two)."""
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        noted = calls[0] <= max(2, every)
        if noted:
            mark(f"{label} #{calls[0]} start")
        try:
            return original(*args, **kwargs)
        finally:
            if noted:
                mark(f"{label} #{calls[0]} end")

    setattr(owner, name, wrapped)


def _import_classes(folder: Path) -> None:
    """Import the pipeline and component classes ``model_index.json`` names (libraries, no weights)."""
    index = json.loads((folder / "model_index.json").read_text())
    pairs = [("diffusers", index["_class_name"])]
    pairs += [tuple(v) for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]
    for library, name in pairs:
        if library and name:
            getattr(importlib.import_module(library), name, None)


def _install_hooks() -> None:
    """The moments of a run: ``BEFORE_LOAD`` always, the trace with ``LDP_MEMORY_TRACE``."""
    import lightning_dit_parallel.app.sampling.pipeline_sampler as sampler

    load = sampler.load_pipeline

    @functools.wraps(load)
    def load_pipeline(path, *args, **kwargs):
        if not BEFORE_LOAD:
            _import_classes(Path(path))
            BEFORE_LOAD.append(current_rss())
        mark("load start")
        try:
            return load(path, *args, **kwargs)
        finally:
            mark("load end")

    sampler.load_pipeline = load_pipeline
    if not os.environ.get("LDP_MEMORY_TRACE"):
        return
    import lightning_dit_parallel.strategies.base as base

    _wrap(base.DiTParallelStrategy, "setup_environment", "setup_environment (process group)")
    _wrap(base.DiTParallelStrategy, "setup", "strategy setup")
    _wrap(base, "parallelize", "parallelize")
    _wrap(base, "materialize", "materialize (read weights)")
    _wrap(base.DiTParallelStrategy, "teardown", "teardown")
    import sys

    par = sys.modules["lightning_dit_parallel.parallel.compose"]

    for name in (
        "find_planned_modules",
        "encoder_paths",
        "_apply_pipeline",
        "_shard_encoders",
        "_apply_fsdp",
        "apply_tensor_parallel",
        "apply_input_guard",
        "check_complete",
        "_resolve_tensor_parallel",
    ):
        _wrap(par, name, f"  {name}")
    _wrap(sampler, "ensure_loaded", "ensure_loaded", every=1)
    for cls_name in ("WanPipeline",):
        cls = getattr(diffusers, cls_name, None)
        if cls is not None:
            _wrap(cls, "encode_prompt", "encode_prompt")
            _wrap(cls, "__call__", "pipeline call")
    _wrap(diffusers.WanTransformer3DModel, "forward", "DiT forward", every=3)
    _wrap(diffusers.AutoencoderKLWan, "decode", "VAE decode")


def _record() -> None:
    out = Path(os.environ["LDP_PEAK_DIR"])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    mark("exit")
    record = {
        "rank": rank,
        "baseline": BASELINE,
        "before_load": BEFORE_LOAD[0] if BEFORE_LOAD else None,
        "peak": peak_rss(),
        "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "trace": TRACE,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    atexit.register(_record)
    _install_hooks()
    mark("imports")
    cli.main()
