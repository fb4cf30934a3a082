"""Reading back the videos that ``app/videos.py`` writes (tests compare them with the PNG frames)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def read_video(path: Path) -> Tensor:
    """Decode a video written by ``save_video`` back to (F, H, W, 3) uint8 (MP4 through imageio-ffmpeg)."""
    import imageio_ffmpeg
    import numpy as np

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return torch.from_numpy(np.stack(frames))
