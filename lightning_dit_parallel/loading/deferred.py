"""Memory-lean loading: build on the meta device, parallelize, then read from safetensors only what a rank keeps.

With FSDP or pipeline sharding a rank never needs the whole model. The flow:

1. ``build_on_meta(build)`` constructs the model with its parameters on the meta device (no memory; buffers,
   which are small and often computed in ``__init__``, stay real);
2. ``defer_weights(model, "model.safetensors")`` notes where the weights are;
3. the strategy parallelizes (FSDP turns parameters into Shard(0) DTensors, a pipeline stage releases the
   blocks it does not own) and then calls ``materialize``: every parameter still on the meta device gets
   storage for this rank's part only, and that part is read from the file straight into it (a dim-0 shard
   is one contiguous byte range of a row-major tensor), so a rank's memory grows by what it keeps and no
   more: no whole-tensor copy, no mapped file pages. Other regions or a dtype conversion go through
   ``safe_open(...).get_slice``, which still reads only the region.

Without any parallelism ``materialize`` loads the whole model, so one code path serves one process too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import nn

from lightning_dit_parallel.utils.memory import local_tensor

M = TypeVar("M", bound=nn.Module)

#: Instance attribute that ``defer_weights`` sets on a module.
DEFERRED_ATTR = "_ldp_deferred_weights"


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, every parameter a module registers is moved to the meta device at once."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_on_meta(build: Callable[[], M]) -> M:
    """``build()`` with parameters on the meta device (one parameter at a time is ever real)."""
    with parameters_on_meta():
        return build()


def defer_weights(module: M, path: str | Path) -> M:
    """Mark ``module`` (built with ``build_on_meta``) to be filled from the safetensors file ``path`` by
    ``materialize``, after parallelization. Keys are ``module.state_dict()`` keys.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"defer_weights: no safetensors file at {path}.")
    module.__dict__[DEFERRED_ATTR] = str(path)
    return module


def materialize(root: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Fill every module under ``root`` marked by ``defer_weights``; returns the paths of those modules.

    A no-op where nothing is deferred.
    """
    done = []
    for path, module in list(root.named_modules()):
        file = module.__dict__.pop(DEFERRED_ATTR, None)
        if file is not None:
            load_local_weights(module, file, device)
            done.append(path or type(module).__name__)
    return done


def load_local_weights(module: nn.Module, file: str | Path, device: torch.device | str = "cpu") -> int:
    """Give every meta parameter of ``module`` storage for this rank's part and read that part from ``file``.

    A plain parameter is read whole; a DTensor parameter (FSDP) only in its local shard's rows. Parameters that
    are already real are left alone. Returns the number of bytes read.

    Raises:
        KeyError: when the file lacks a parameter the module still needs.
        ValueError: when a stored tensor's shape differs from the parameter's.
    """
    device = torch.device(device)
    pending = {name: p for name, p in module.named_parameters() if local_tensor(p).is_meta}
    if not pending:
        return 0
    # storage for the local part of each meta tensor only (a DTensor shard keeps its placement)
    module._apply(lambda t: torch.empty_like(t, device=device) if local_tensor(t).is_meta else t)
    params = dict(module.named_parameters())
    header, data_start = read_header(file)
    missing = sorted(set(pending) - set(header))
    if missing:
        raise KeyError(f"{file} lacks {len(missing)} parameter(s) of {type(module).__name__}: {missing[:5]}")
    read = 0
    with open(file, "rb") as raw, safe_open(str(file), framework="pt", device="cpu") as f:
        for name in pending:
            param, entry = params[name], header[name]
            if tuple(entry["shape"]) != tuple(param.shape):
                raise ValueError(
                    f"{file}: {name} is stored with shape {tuple(entry['shape'])}, the model has {tuple(param.shape)}."
                )
            local = local_tensor(param)
            region = _local_region(param)
            rows = _row_range(region, param.shape)
            with torch.no_grad():
                same_dtype = _DTYPES.get(entry["dtype"]) == local.dtype
                in_place = same_dtype and local.is_contiguous() and local.device.type == "cpu"
                if rows is not None and in_place:
                    # this rank's rows [start, stop) of a row-major tensor: one contiguous byte range, read in place
                    row_bytes = local.element_size() * math.prod(param.shape[1:])
                    raw.seek(data_start + entry["data_offsets"][0] + rows[0] * row_bytes)
                    buffer = local.view(-1).view(torch.uint8).numpy()  # (local numel * itemsize,) bytes
                    if raw.readinto(memoryview(buffer)) != buffer.size:
                        raise ValueError(f"{file}: {name} is truncated.")
                    read += buffer.size
                else:
                    part = f.get_slice(name)[region] if region is not None else f.get_tensor(name)
                    local.copy_(part.reshape(local.shape))  # (local shape) from the stored region
                    read += part.numel() * part.element_size()
    return read


#: safetensors dtype names -> torch dtypes, for reading in place.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_header(file: str | Path) -> tuple[dict, int]:
    """The safetensors header (name -> dtype, shape, data_offsets) and the byte offset where data starts."""
    import json
    import struct

    with open(file, "rb") as raw:
        (size,) = struct.unpack("<Q", raw.read(8))  # little-endian u64: header length
        header = json.loads(raw.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _row_range(region: tuple[slice, ...] | None, shape: torch.Size) -> tuple[int, int] | None:
    """``(start, stop)`` rows when ``region`` cuts dim 0 only (or is the whole tensor), else ``None``."""
    if region is None:
        return (0, shape[0]) if len(shape) else (0, 1)
    if any(s.start != 0 or s.stop != n for s, n in zip(region[1:], shape[1:])):
        return None
    return region[0].start, region[0].stop


def save_weights(module: nn.Module, file: str | Path) -> None:
    """Write ``module.state_dict()`` to a safetensors file (tensors made contiguous, tied ones cloned)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(file))


def _local_region(param: torch.Tensor) -> tuple[slice, ...] | None:
    """Slices of the global tensor that this rank's shard covers, or ``None`` for a plain tensor."""
    if not hasattr(param, "placements"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))
