"""Runs ``ldp-predict`` with its arguments and, at exit, writes this process' memory to ``$LDP_PEAK_DIR``.

``bench/memory.py`` starts it; Lightning's launcher re-runs the same command for the other ranks, so every rank
records: ``baseline`` (resident bytes after the interpreter and libraries are imported, before any model is
loaded), ``peak`` (``VmHWM``: the peak over the whole run, teardown included) and, on a GPU,
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import diffusers  # noqa: F401  (imported before the baseline: libraries are not the model)
import lightning  # noqa: F401
import torch
import transformers  # noqa: F401

import lightning_dit_parallel.app.cli as cli
from lightning_dit_parallel.utils.memory import current_rss, peak_rss

BASELINE = current_rss()


def _record() -> None:
    out = Path(os.environ["LDP_PEAK_DIR"])
    rank = int(os.environ.get("LOCAL_RANK", 0))
    record = {
        "rank": rank,
        "baseline": BASELINE,
        "peak": peak_rss(),
        "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    atexit.register(_record)
    cli.main()
