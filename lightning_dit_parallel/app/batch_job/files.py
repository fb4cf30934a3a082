"""Atomic per-sample files: every file is written under a temporary name in its folder, then renamed.

A process killed while writing leaves at most a temporary file (``.tmp-<pid>-<name>``), never a partial output;
``remove_temporaries`` deletes those left by an earlier run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lightning_dit_parallel.app.images import to_pil
from lightning_dit_parallel.app.videos import save_video

#: Prefix of temporary names (a leading dot hides them; no other dot, so ``with_suffix`` appends).
TMP_MARK = ".tmp-"


def _temporary(path: Path) -> Path:
    return path.with_name(f"{TMP_MARK}{os.getpid()}-{path.name}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` with a temporary path next to ``path``, then rename it to ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_tensor(tensor: Tensor, path: Path) -> Path:
    """One sample's tensor as ``{"prediction": tensor}`` (read back with ``torch.load(..., weights_only=True)``)."""
    tensor = tensor.detach().cpu().clone()  # a view would save its whole batch's storage
    return atomic_write(path, lambda tmp: torch.save({"prediction": tensor}, tmp))


def save_png(image: Tensor, path: Path, scale: int) -> Path:
    """One image (C, H, W) in [0, 1] as a PNG, enlarged ``scale`` times."""
    return atomic_write(path, lambda tmp: to_pil(image, scale).save(tmp, format="PNG"))


def save_video_files(video: Tensor, directory: Path, name: str, fps: int) -> list[Path]:
    """``<directory>/<name>.mp4`` (``.gif`` without imageio-ffmpeg) and the frames ``<directory>/<name>/<f>.png``;
    the frame folder is filled under a temporary name and renamed as a whole."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{TMP_MARK}{os.getpid()}-{name}"
    video_tmp = save_video(video, stem, fps)
    final = directory / f"{name}{video_tmp.suffix}"
    frames_tmp = directory / f"{TMP_MARK}{os.getpid()}-{name}-frames"
    shutil.rmtree(frames_tmp, ignore_errors=True)
    frames_tmp.mkdir()
    frame_paths = []
    for f, frame in enumerate(video):
        frame_paths.append(f"{f:04d}.png")
        to_pil(frame, 1).save(frames_tmp / frame_paths[-1], format="PNG")
    frames = directory / name
    if frames.exists():  # a sample generated again (its manifest line was lost): replace the old frames
        shutil.rmtree(frames)
    os.replace(frames_tmp, frames)
    os.replace(video_tmp, final)  # the video last: it marks the sample's files as complete
    return [final, *(frames / p for p in frame_paths)]


def remove_temporaries(*directories: Path) -> int:
    """Delete the temporary files and folders an interrupted run left in ``directories``; returns how many."""
    removed = 0
    for directory in directories:
        if not directory.is_dir():
            continue
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(TMP_MARK):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    removed += 1
    return removed
