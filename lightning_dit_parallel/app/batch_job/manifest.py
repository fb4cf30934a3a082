"""The record of a batch job in its output folder, in JSON only (nothing found there is ever unpickled).

- ``run.json``: the configuration that determines the outputs (``run_config``: model, data, output options) and the
  number of samples. A rerun in the same folder must present the same configuration; otherwise
  ``RunConfigMismatch`` names every key that differs, before any sample is generated.
- ``manifest.rank<k>.jsonl``: one line per finished batch of global rank ``k``, appended and flushed after the
  batch's files are complete: ``{"indices": [...], "files": [[...], ...], "prompts": [...]}`` (files relative to
  the folder, one list per sample; prompts when the batches carry text). A process killed while appending leaves
  at most an incomplete last line, which is ignored: those samples are generated again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_dit_parallel.app.batch_job.files import atomic_text

RUN_FILE = "run.json"
MANIFEST_GLOB = "manifest.rank*.jsonl"
#: Version of the folder layout written to ``run.json``.
FORMAT = 1


class RunConfigMismatch(ValueError):
    """The output folder holds samples of a run with another configuration."""


def manifest_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / f"manifest.rank{rank}.jsonl"


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): config}


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: recorded -> current"`` for every dotted key whose value differs (missing keys show as ``<absent>``)."""
    old, new = _flatten(recorded), _flatten(current)
    return [
        f"{key}: {json.dumps(old.get(key, '<absent>'))} -> {json.dumps(new.get(key, '<absent>'))}"
        for key in sorted(set(old) | set(new))
        if old.get(key, "<absent>") != new.get(key, "<absent>")
    ]


def read_run_file(output_dir: Path) -> dict[str, Any] | None:
    """``run.json`` of the folder, or ``None`` when there is none."""
    path = Path(output_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunConfigMismatch(
            f"{path} is not valid JSON ({error}); it is not a run folder of this package."
        ) from error


def check_run_file(output_dir: Path, run_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Compare the folder's ``run.json`` with this run; raise ``RunConfigMismatch`` naming every difference.

    Returns the recorded ``run.json`` (``None`` for a folder without one).
    """
    recorded = read_run_file(output_dir)
    if recorded is None:
        return None
    current = json.loads(json.dumps(run_config))  # the JSON form of the values (tuples -> lists ...)
    differences = config_differences(recorded.get("config", {}), current)
    if differences:
        raise RunConfigMismatch(
            f"The output folder {output_dir} holds samples of a run with another configuration; mixing them would "
            f"give a folder of two different runs. Differences (recorded -> now): {'; '.join(differences)}. Use "
            "another output folder (ldp-predict: output_dir=...), or the recorded configuration to resume."
        )
    return recorded


def write_run_file(output_dir: Path, run_config: Mapping[str, Any], num_samples: int) -> Path:
    """Write ``run.json`` atomically."""
    record = {"format": FORMAT, "num_samples": num_samples, "config": run_config}
    return atomic_text(Path(output_dir) / RUN_FILE, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def _manifest_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.endswith("\n"):  # the last line of a process killed while appending
                return
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_manifests(output_dir: Path) -> Iterator[tuple[int, list[str], str | None]]:
    """``(index, files, prompt)`` for every sample recorded in the folder's manifests (repeats possible)."""
    for path in sorted(Path(output_dir).glob(MANIFEST_GLOB)):
        for entry in _manifest_lines(path):
            indices = entry.get("indices", [])
            files = entry.get("files") or [[] for _ in indices]
            prompts = entry.get("prompts") or [None for _ in indices]
            for index, sample_files, prompt in zip(indices, files, prompts):
                yield int(index), list(sample_files), prompt


def finished_indices(output_dir: Path) -> set[int]:
    """The samples recorded in a manifest whose files all exist (a sample whose file was deleted is done again)."""
    output_dir = Path(output_dir)
    listings: dict[Path, set[str]] = {}

    def exists(relative: str) -> bool:
        path = output_dir / relative
        if path.parent not in listings:
            listings[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        return path.name in listings[path.parent]

    return {index for index, files, _ in read_manifests(output_dir) if all(exists(f) for f in files)}


class ManifestAppender:
    """Appends one JSON line per finished batch to ``manifest.rank<rank>.jsonl`` and flushes it.

    Args:
        output_dir: the run folder.
        rank: the global rank that writes (one file per writing rank: no two processes append to one file).
        durable: also ``fsync`` after every line (survives a power loss, not only a killed process).
    """

    def __init__(self, output_dir: Path, rank: int, durable: bool = False) -> None:
        self.path = manifest_path(output_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        incomplete = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as file:
                file.seek(-1, os.SEEK_END)
                incomplete = file.read(1) != b"\n"  # a process killed while appending: end its line first
        self._file = open(self.path, "a", encoding="utf-8")
        self._durable = durable
        if incomplete:
            self._file.write("\n")

    def append(self, indices: Sequence[int], files: Sequence[Sequence[str]], prompts: Sequence[str] | None) -> None:
        entry: dict[str, Any] = {"indices": [int(i) for i in indices], "files": [list(f) for f in files]}
        if prompts is not None:
            entry["prompts"] = list(prompts)
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._durable:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
