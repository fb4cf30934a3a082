"""Save video tensors (F, C, H, W) in [0, 1]: an MP4 through the ffmpeg that ``imageio-ffmpeg`` ships (an animated
GIF when it is not installed), and every frame as a PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_dit_parallel.app.images import save_images, to_pil


def _check_video(video: Tensor) -> None:
    if video.ndim != 4 or video.shape[1] not in (1, 3):
        raise ValueError(f"expected a video (F, C, H, W) with C in (1, 3), got shape {tuple(video.shape)}.")


def to_uint8_frames(video: Tensor) -> Tensor:
    """(F, C, H, W) in [0, 1] -> (F, H, W, 3) uint8 (grey videos repeated to RGB)."""
    _check_video(video)
    frames = (video.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # (F, C, H, W)
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    return frames.permute(0, 2, 3, 1).contiguous()  # (F, H, W, 3)


def save_video(video: Tensor, path_stem: Path, fps: int = 8) -> Path:
    """Write one video as ``<stem>.mp4`` (lossless H.264 in RGB, even frame sizes padded) or, without
    ``imageio-ffmpeg``, ``<stem>.gif``; returns the path."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(video)  # (F, H, W, 3)
    try:
        import imageio_ffmpeg
    except ImportError:
        path = path_stem.with_suffix(".gif")
        pictures = [to_pil(f.permute(2, 0, 1).float() / 255) for f in frames]
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=int(1000 / fps), loop=0)
        return path
    path = path_stem.with_suffix(".mp4")
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264rgb",
        pix_fmt_out="rgb24",
        macro_block_size=1,
        output_params=["-qp", "0"],  # lossless: the decoded frames equal the PNGs
    )
    writer.send(None)
    for frame in frames:
        writer.send(frame.numpy().tobytes())
    writer.close()
    return path


def save_videos(videos: Tensor, names: list[str], directory: Path, fps: int = 8) -> list[Path]:
    """``<directory>/<name>.mp4`` (or ``.gif``) and ``<directory>/<name>/<frame>.png`` for every video
    (N, F, C, H, W)."""
    if videos.ndim != 5:
        raise ValueError(f"expected videos (N, F, C, H, W), got shape {tuple(videos.shape)}.")
    if len(names) != videos.shape[0]:
        raise ValueError(f"need one name per video, got {len(names)} names for {videos.shape[0]} videos.")
    directory = Path(directory)
    paths: list[Path] = []
    for video, name in zip(videos, names):
        paths.append(save_video(video, directory / name, fps))
        paths += save_images(video, [f"{f:04d}" for f in range(video.shape[0])], directory / name, scale=1)
    return paths
