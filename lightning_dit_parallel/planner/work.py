"""The work (what is generated) and the hardware (what runs it), as the planner's inputs.

Sizes given as text accept binary and decimal units: ``"24GiB"``, ``"80GB"``, ``"512MiB"``, a plain number of
bytes; bandwidths ``"25GB/s"``; compute ``"150TFLOPS"`` (``parse_*`` below).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

CfgCalls = Literal["doubled", "separate"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

#: Bytes per element of the dtypes the planner accepts.
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "fp32": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float8_e4m3fn": 1,
    "fp8": 1,
}


def parse_bytes(text: str | int | float) -> int:
    """``"24GiB"`` -> 25769803776; ``"80GB"`` -> 80000000000; numbers pass through.

    Raises:
        ValueError: for text that is not a number with one of the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"Cannot read a size from {text!r}; write e.g. 24GiB, 80GB, 512MiB or a number of bytes.")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_rate(text: str | int | float, per: str) -> float:
    """``"25GB/s"`` (``per="/s"``) or ``"150TFLOPS"`` (``per="FLOPS"``) -> the number per second."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    stripped = str(text).strip()
    for suffix in (per, per.lower(), per.upper()):
        if stripped.endswith(suffix):
            stripped = stripped[: -len(suffix)]
            break
    if per == "FLOPS":
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtTpP]?)\s*", stripped)
        if match is None:
            raise ValueError(f"Cannot read a compute rate from {text!r}; write e.g. 150TFLOPS or 1.5e14.")
        scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}[match.group(2).lower()]
        return float(match.group(1)) * scale
    return float(parse_bytes(stripped))


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given by name (``"bfloat16"``) or as a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_BYTES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)}.")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class Work:
    """What is generated.

    Args:
        height, width: output size in pixels (with the VAE's compression and the patch size they give the tokens).
        frames: output frames of a video (``None`` or 1 for images).
        tokens: latent tokens of one sample, instead of height/width/frames.
        text_tokens: text tokens after the tokenizer's padding (the pipeline's ``max_sequence_length``).
        batch: samples per pipeline call of one data-parallel group.
        samples: samples to generate in all (default: ``batch``); data parallelism only helps with more.
        cfg: classifier-free guidance on (a second, unconditional pass).
        cfg_calls: ``"doubled"``: the DiT receives both passes as one doubled batch (SD3, PixArt, CogVideoX
            pipelines, ``DiffusionSampler``): CFG parallelism splits its rows; ``"separate"``: two DiT calls per step
            (Wan, QwenImage pipelines): CFG parallelism gives each rank of a pair one of the two calls.
        steps: denoising steps.
        sequences: token counts of further cut sequences of the plan (e.g. ``{"audio": 128}``).
    """

    height: int | None = None
    width: int | None = None
    frames: int | None = None
    tokens: int | None = None
    text_tokens: int = 512
    batch: int = 1
    samples: int | None = None
    cfg: bool = True
    cfg_calls: CfgCalls = "doubled"
    steps: int = 50
    sequences: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens is None and (self.height is None or self.width is None):
            raise ValueError(f"Give the work's height and width (and frames for video), or tokens; got {self}.")
        for name in ("height", "width", "frames", "tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None; got {value!r}.")
        for name in ("batch", "steps", "text_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "text_tokens" else 1):
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}.")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise ValueError(f"samples must be a positive integer or None; got {self.samples!r}.")
        if self.cfg_calls not in ("doubled", "separate"):
            raise ValueError(f"cfg_calls must be 'doubled' or 'separate'; got {self.cfg_calls!r}.")

    @property
    def total_samples(self) -> int:
        return self.samples if self.samples is not None else self.batch

    @property
    def rows(self) -> int:
        """Rows of one DiT call of one data-parallel group."""
        return self.batch * (2 if self.cfg and self.cfg_calls == "doubled" else 1)

    @property
    def calls_per_step(self) -> int:
        return 2 if self.cfg and self.cfg_calls == "separate" else 1

    def rank_rows(self, cfg: int) -> int:
        """Rows of one DiT call on a rank of a CFG group of ``cfg`` ranks: the doubled batch is split, separate
        calls are not."""
        return self.rows if self.calls_per_step > 1 else -(-self.rows // cfg)

    def rank_calls_per_step(self, cfg: int) -> int:
        """DiT calls per step on a rank of a CFG group of ``cfg`` ranks: with separate calls each rank of the pair
        makes one of the two (``guidance/``: the other's output is exchanged)."""
        return -(-self.calls_per_step // cfg)


@dataclass(frozen=True)
class Hardware:
    """What runs the work.

    Args:
        devices: devices per node.
        nodes: nodes.
        memory: bytes of memory per device.
        flops: dense matrix-multiply throughput per device in the dtype, FLOP/s (achieved, not the datasheet peak).
        bandwidth: bytes/s one device sends to the others of its node (NVLink, PCIe).
        inter_node_bandwidth: bytes/s one device sends to another node.
        reserve: bytes per device kept free (CUDA context, allocator fragmentation); a layout fits when its peak
            is at most ``memory - reserve``.
        device_type: ``"cuda"`` (FSDP prefetches the next block while one runs: two blocks gathered at once;
            transfers overlap compute) or ``"cpu"`` (no prefetch, transfers exposed).
        host_bandwidth: bytes/s one device reads from pinned host memory (PCIe), for host offload.
    """

    devices: int
    nodes: int = 1
    memory: int = 24 * 2**30
    flops: float = 100e12
    bandwidth: float = 25e9
    inter_node_bandwidth: float = 12.5e9
    reserve: int = 2**30
    device_type: Literal["cuda", "cpu"] = "cuda"
    host_bandwidth: float = 25e9

    def __post_init__(self) -> None:
        if self.devices < 1 or self.nodes < 1:
            raise ValueError(f"devices and nodes must be >= 1; got devices={self.devices}, nodes={self.nodes}.")
        if (
            self.memory <= 0
            or self.flops <= 0
            or self.bandwidth <= 0
            or self.inter_node_bandwidth <= 0
            or self.host_bandwidth <= 0
        ):
            raise ValueError(f"memory, flops and bandwidths must be positive; got {self}.")
        if self.device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu'; got {self.device_type!r}.")

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes

    @property
    def usable_memory(self) -> int:
        return self.memory - self.reserve
