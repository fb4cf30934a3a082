"""The matrix as a test: real diffusers pipelines x parallel layouts, every cell exact or a documented refusal.

Every pipeline of ``tests/matrix_pipelines.py`` is built tiny and seeded, saved with ``save_pretrained`` and loaded by
path with ``DiffusionPipeline.from_pretrained`` inside a LightningModule that holds it as ``self.pipe`` and calls it
through its own ``__call__`` (the decoded output, ``output_type="pt"``). Each cell runs ``Trainer.predict`` under one
layout and compares every rank's output with the one-process output of the same pipeline loaded the same way (computed
once per pipeline in the parent, float32, relative 1e-5), or asserts the refusal message, raised on every rank at
setup. All 2-rank cells run in one launch of 2 processes, the 4-rank cells in one launch of 4.

A cell that fails where it should not is listed in ``KNOWN_FAILURES`` and marked ``xfail(strict=True)``: fixing it
makes the test fail, to remind us to move it to the exact cells. ``LDP_MATRIX_TABLE=<file>`` writes the table of
``docs/families.md`` from the results (``render_table``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_dit_parallel import (
    DiTParallelStrategy,
    PipelineStrategy,
    SequenceParallelStrategy,
    TensorParallelStrategy,
)
from lightning_dit_parallel.app.prompts import prompt_loader
from tests.distributed import free_port, run_on_ranks
from tests.in_process import external_launch, predict_here
from tests.matrix_pipelines import LABELS, PIPELINES, MatrixPipeline, load, save

pytest.importorskip("peft")  # the Flux pipeline loads a LoRA

PROMPTS = ["a red cat", "a blue dog on the grass"]
#: collectives wait this long for a peer: a cell that fails on one rank only fails the others instead of hanging
TIMEOUT_S = 60

#: layout -> (processes, strategy); FSDP shards the pipeline's text (and image) encoders too (its default)
LAYOUTS: dict[str, tuple[int, Any]] = {
    "ulysses2": (2, lambda: SequenceParallelStrategy(ulysses_degree=2, timeout=TIMEOUT_S)),
    "ring2": (2, lambda: SequenceParallelStrategy(ring_degree=2, timeout=TIMEOUT_S)),
    "fsdp_ulysses2": (2, lambda: DiTParallelStrategy(ulysses_degree=2, fsdp=True, timeout=TIMEOUT_S)),
    "pp2": (2, lambda: PipelineStrategy(pp_degree=2, timeout=TIMEOUT_S)),
    "tp2": (2, lambda: TensorParallelStrategy(tp_degree=2, timeout=TIMEOUT_S)),
    "ulysses2_vae": (2, lambda: SequenceParallelStrategy(ulysses_degree=2, parallel_vae=True, timeout=TIMEOUT_S)),
    "cfg2_ulysses2": (4, lambda: DiTParallelStrategy(cfg_degree=2, ulysses_degree=2, timeout=TIMEOUT_S)),
}

#: the columns of the docs table
LAYOUT_LABELS = {
    "ulysses2": "Ulysses 2",
    "ring2": "Ring 2",
    "fsdp_ulysses2": "FSDP x Ulysses 2, encoders sharded",
    "pp2": "pipeline 2",
    "tp2": "tensor parallel 2",
    "ulysses2_vae": "Ulysses 2 + parallel VAE",
    "cfg2_ulysses2": "CFG 2 x Ulysses 2 (4 ranks)",
}

#: (pipeline, layout) -> a part of the refusal every rank raises at setup (documented, not a bug)
REFUSALS: dict[tuple[str, str], str] = {}

#: (pipeline, layout) -> why the cell fails today (a bug or a missing feature); strict xfail
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


class HoldsPipeline(L.LightningModule):
    """``self.pipe = DiffusionPipeline.from_pretrained(folder)``, nothing else registered; ``predict_step`` calls the
    pipeline with per-sample generators seeded from the global sample index. Records what the layout did: which
    encoders were sharded (their parameters DTensors), whether the DiT's parameters were DTensors (FSDP, tensor
    parallel), and the latent rows the VAE decoder's first convolution saw (fewer than one process with a banded
    decode)."""

    def __init__(self, entry: MatrixPipeline, folder: Path) -> None:
        super().__init__()
        self.entry = entry
        self.pipe = load(entry, folder)
        self.sharded: set[str] = set()
        self.encoders = sorted(n for n, c in self.pipe.components.items() if _is_encoder(c))
        self.dit_dtensor = False
        self.vae_rows: list[int] = []
        self._probe = None

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        for name, component in self.pipe.components.items():
            if _is_encoder(component) and any(isinstance(p, DTensor) for p in component.parameters()):
                self.sharded.add(name)
        self.dit_dtensor |= any(isinstance(p, DTensor) for p in self.pipe.transformer.parameters())
        if self._probe is None:  # after the strategy's setup: the decoder's cut (if any) is installed
            conv_in = self.pipe.vae.decoder.conv_in
            self._probe = conv_in.register_forward_pre_hook(lambda m, args: self.vae_rows.append(args[0].shape[-2]))
        generators = [torch.Generator("cpu").manual_seed(int(i)) for i in batch["index"]]
        torch.manual_seed(1234)  # LTX's VAE draws its decoder noise from the global generator
        return self.entry.invoke(self.pipe, list(batch["prompt"]), generators, self.entry.call)


def _is_encoder(component: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(component, PreTrainedModel)


def loader():
    return prompt_loader(PROMPTS, batch_size=len(PROMPTS))


def reference(name: str, folder: Path) -> tuple[torch.Tensor, list[int]]:
    """The one-process output of the pipeline loaded from ``folder``, and the rows its VAE decoder saw."""
    module = HoldsPipeline(PIPELINES[name], folder)
    with torch.no_grad():
        return module.predict_step(next(iter(loader())), 0), module.vae_rows


def _run(
    rank: int, world: int, ports: tuple[int, int], cells: list[tuple[str, str]], folders: dict, refs: dict
) -> dict:
    """Every cell of this launch in a row; per cell: ("exact", error) / ("error", message) / ("wrong", error)."""
    results: dict[str, Any] = {}
    with external_launch(rank, world, *ports):
        for name, layout in cells:
            start = time.perf_counter()
            module = HoldsPipeline(PIPELINES[name], folders[name])
            try:
                out = predict_here(module, loader(), LAYOUTS[layout][1](), world)
            except Exception as err:  # noqa: BLE001 - the parent compares the message of every rank
                if os.environ.get("LDP_MATRIX_TRACEBACKS"):
                    import traceback

                    traceback.print_exc()
                results[f"{name}|{layout}"] = ("error", f"{type(err).__name__}: {err}", {}, time.perf_counter() - start)
                continue
            ref, ref_rows = refs[name]
            error = ((out - ref).abs().max() / ref.abs().max()).item() if out.shape == ref.shape else float("inf")
            kind = "exact" if error <= 1e-5 else "wrong"
            evidence = dict(
                sharded=sorted(module.sharded),
                encoders=module.encoders,
                dit_dtensor=module.dit_dtensor,
                vae_rows=module.vae_rows,
                one_process_vae_rows=ref_rows,
            )
            results[f"{name}|{layout}"] = (kind, error, evidence, time.perf_counter() - start)
    return results


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[tuple[str, str], list]:
    """(pipeline, layout) -> every rank's result; the references in the parent, then one launch per world size."""
    begin = time.perf_counter()
    folders = {name: save(entry, tmp_path_factory.mktemp(name)) for name, entry in PIPELINES.items()}
    refs = {name: reference(name, folder) for name, folder in folders.items()}
    results: dict[tuple[str, str], list] = {}
    for world in sorted({w for w, _ in LAYOUTS.values()}):
        cells = [(n, lay) for lay, (w, _) in LAYOUTS.items() if w == world for n in PIPELINES]
        per_rank = run_on_ranks(world, _run, (free_port(), free_port()), cells, folders, refs, timeout_s=600)
        for key in per_rank[0]:
            results[tuple(key.split("|"))] = [r[key] for r in per_rank]
    table = os.environ.get("LDP_MATRIX_TABLE")
    if table:
        Path(table).write_text(render_table(results))
        Path(table).with_suffix(".json").write_text(
            json.dumps({f"{k[0]}|{k[1]}": v for k, v in results.items()}, indent=1, default=str)
        )
    print(f"pipeline matrix: {len(results)} cells in {time.perf_counter() - begin:.1f} s")
    return results


def _params() -> list:
    params = []
    for layout in LAYOUTS:
        for name in PIPELINES:
            marks = ()
            if (name, layout) in KNOWN_FAILURES:
                marks = pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name, layout])
            params.append(pytest.param(name, layout, id=f"{name}-{layout}", marks=marks))
    return params


@pytest.mark.parametrize("name,layout", _params())
def test_cell(matrix, name: str, layout: str):
    ranks = matrix[name, layout]
    expected = REFUSALS.get((name, layout))
    if expected is not None:
        messages = [r[1] for r in ranks]
        assert all(r[0] == "error" for r in ranks), f"{name} {layout}: expected a refusal, got {ranks}"
        assert len(set(messages)) == 1, f"{name} {layout}: the ranks disagree: {messages}"
        assert expected in messages[0], f"{name} {layout}: {expected!r} not in {messages[0]!r}"
        return
    for rank, (kind, value, seen, _) in enumerate(ranks):
        where = f"{name} {layout}, rank {rank}"
        assert kind == "exact", f"{where}: {kind}: {value}"
        # the layouts that cut the DiT's memory shard the text (and image) encoders too (the strategy's default)
        encoders = seen["encoders"] if layout.startswith(("fsdp", "pp", "tp")) else []
        assert seen["sharded"] == encoders, f"{where}: encoders sharded {seen['sharded']}, expected {encoders}"
        # between DiT calls: FSDP and tp shards, and pipeline stages' rows of the weights outside the blocks
        sharded_dit = layout.startswith(("fsdp", "tp", "pp"))
        assert seen["dit_dtensor"] == sharded_dit, f"{where}: DiT parameters DTensors: {seen}"
        full = seen["one_process_vae_rows"]
        if layout.endswith("_vae"):  # each rank decoded a band of the latent's rows
            assert seen["vae_rows"] and max(seen["vae_rows"]) < min(full), f"{where}: decoder rows {seen}"
        else:
            assert seen["vae_rows"] == full, f"{where}: decoder rows {seen}"


# -- the table of docs/families.md ---------------------------------------------------------------------------------


def _cell_text(name: str, layout: str, ranks: list) -> str:
    """``exact``, ``refused: <first sentence>`` (a documented refusal), or, for a cell that fails, ``**fails**``."""
    if all(r[0] == "exact" for r in ranks):
        return "exact"
    errors = [r[1] for r in ranks if r[0] == "error"]
    if (name, layout) in REFUSALS and len(errors) == len(ranks) and len(set(errors)) == 1:
        return "refused: " + errors[0].split(". ")[0].replace("|", "/").replace("\n", " ")
    wrong = [r[1] for r in ranks if r[0] == "wrong"]
    if wrong:
        return f"**fails** (relative error {max(wrong):.1e})"
    return "**fails**: " + errors[0].splitlines()[0].replace("|", "/")[:120]


def render_table(results: dict[tuple[str, str], list]) -> str:
    """The markdown table: a row per pipeline, a column per layout."""
    names = list(dict.fromkeys(n for n, _ in results))
    layouts = list(dict.fromkeys(lay for _, lay in results))
    lines = [
        "| pipeline | " + " | ".join(LAYOUT_LABELS[lay] for lay in layouts) + " |",
        "|---" * (len(layouts) + 1) + "|",
    ]
    for name in names:
        cells = " | ".join(_cell_text(name, lay, results[name, lay]) for lay in layouts)
        lines.append(f"| {LABELS[name]} | {cells} |")
    return "\n".join(lines) + "\n"


def test_the_lora_changes_the_flux_output(tmp_path):
    """The LoRA cell is not vacuous: without ``load_lora_weights`` the same pipeline gives another output."""
    entry = PIPELINES["flux_lora"]
    folder = save(entry, tmp_path)
    with_lora = reference("flux_lora", folder)[0]
    plain = HoldsPipeline(dataclasses.replace(entry, lora=False), folder)
    with torch.no_grad():
        without = plain.predict_step(next(iter(loader())), 0)
    assert (with_lora - without).abs().max() > 0.05, "the LoRA adapter does not change the output"
