"""Memory-lean loading: build on the meta device, parallelize, then read from safetensors only what a rank keeps.

With FSDP, tensor parallelism or pipeline stages a rank never needs the whole model. The flow:

1. ``build_on_meta(build)`` constructs the model with its parameters on the meta device (no memory; buffers,
   which are small and often computed in ``__init__``, stay real);
2. ``defer_weights(model, files)`` notes where the weights are: one safetensors file, several, or the
   ``*.safetensors.index.json`` of a sharded checkpoint;
3. the strategy parallelizes (FSDP turns parameters into Shard(0) DTensors, tensor parallelism into Shard(0|1)
   DTensors, a pipeline stage releases the blocks it does not own) and then calls ``materialize``: every parameter
   still on the meta device gets storage for this rank's part only, and that part is read from its file straight
   into it (a dim-0 shard is one contiguous byte range of a row-major tensor), so a rank's memory grows by what it
   keeps and no more: no whole-tensor copy, no mapped file pages. Other regions or a dtype conversion go through
   ``safe_open(...).get_slice``, which still reads only the region;
4. at teardown the parallelizers put the deferred parameters back on the meta device instead of gathering them
   (``release``), and the next ``materialize`` reads them again: no rank ever holds the whole model.

Without any parallelism ``materialize`` loads the whole model, so one code path serves one process too.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import nn

from lightning_dit_parallel.utils.memory import local_tensor

M = TypeVar("M", bound=nn.Module)

#: Instance attribute that ``defer_weights`` sets on a module: its ``DeferredWeights``.
DEFERRED_ATTR = "_ldp_deferred_weights"

WeightSource = str | Path | Sequence[str | Path]


@dataclass
class DeferredWeights:
    """Where the parameters of a module built on the meta device are stored.

    Attributes:
        files: state-dict key -> safetensors file holding it.
        loaded: whether ``materialize`` has given the module its weights (set back by ``release``).
    """

    files: dict[str, str]
    loaded: bool = False


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, every parameter a module registers is moved to the meta device at once.

    Layers allocate their weight with ``torch.empty`` and register it before initialising it, so the untouched
    allocation is given back at once and never becomes resident.
    """
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


def weight_files(source: WeightSource) -> dict[str, str]:
    """State-dict key -> file for one safetensors file, a list of them, or a ``*.safetensors.index.json``.

    Only the headers are read.

    Raises:
        FileNotFoundError: when a file does not exist.
    """
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
    files: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"defer_weights: no safetensors file at {path}.")
        if path.name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]  # key -> file name beside the index
            for name in sorted(set(weight_map.values())):
                files.update(weight_files(path.parent / name))
            continue
        header, _ = read_header(path)
        files.update(dict.fromkeys(header, str(path)))
    return files


def defer_weights(module: M, source: WeightSource) -> M:
    """Mark ``module`` (built with ``build_on_meta``) to be filled by ``materialize`` after parallelization from
    ``source``: a safetensors file, several, or a sharded checkpoint's ``*.safetensors.index.json``. Keys are
    ``module.state_dict()`` keys (a tied parameter may be stored under any of its names).

    Raises:
        FileNotFoundError: when a file does not exist.
    """
    module.__dict__[DEFERRED_ATTR] = DeferredWeights(weight_files(source))
    return module


def deferred_roots(root: nn.Module) -> list[tuple[str, nn.Module, DeferredWeights]]:
    """``(path, module, weights)`` of every module under ``root`` marked by ``defer_weights``."""
    found = []
    for path, module in root.named_modules():
        deferred = module.__dict__.get(DEFERRED_ATTR)
        if deferred is not None:
            found.append((path, module, deferred))
    return found


def deferred_module_ids(root: nn.Module) -> set[int]:
    """Ids of every module inside a deferred module of ``root`` (itself included): the parameters of these are
    read from their files again rather than gathered over the ranks."""
    return {id(m) for _, module, _ in deferred_roots(root) for m in module.modules()}


def materialize(root: nn.Module, device: torch.device | str = "cpu") -> list[str]:
    """Fill every module under ``root`` marked by ``defer_weights`` (and not loaded yet); returns their paths.

    A no-op where nothing is deferred.
    """
    done = []
    for path, module, deferred in deferred_roots(root):
        if not deferred.loaded:
            load_local_weights(module, deferred.files, device)
            deferred.loaded = True
            done.append(path or type(module).__name__)
    return done


def release(root: nn.Module) -> list[nn.Module]:
    """Put the parameters of every loaded deferred module under ``root`` back on the meta device, to be read again
    by the next ``materialize`` (teardown: the whole model is never gathered). Returns those modules."""
    done = []
    for path, module, deferred in deferred_roots(root):
        if not deferred.loaded:
            continue
        replaced: dict[int, nn.Parameter] = {}  # tied parameters stay tied
        for part in module.modules():
            for name, param in list(part._parameters.items()):
                if param is None:
                    continue
                if id(param) not in replaced:
                    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
                    replaced[id(param)] = nn.Parameter(meta, requires_grad=param.requires_grad)
                part._parameters[name] = replaced[id(param)]
        deferred.loaded = False
        done.append(module)
    return done


def load_local_weights(
    module: nn.Module, source: WeightSource | dict[str, str], device: torch.device | str = "cpu"
) -> int:
    """Give every meta parameter of ``module`` storage for this rank's part and read that part from its file.

    ``source`` is what ``defer_weights`` takes, or a key -> file map. A plain parameter is read whole; a DTensor
    parameter (FSDP, tensor parallel) only in its local region. Parameters that are already real are left alone;
    tied parameters are read once under whichever of their names is stored. Returns the number of bytes read.

    Raises:
        KeyError: when the files lack a parameter the module still needs.
        ValueError: when a stored tensor's shape differs from the parameter's.
    """
    device = torch.device(device)
    files = source if isinstance(source, dict) else weight_files(source)
    names: dict[int, list[str]] = {}  # id of a parameter -> every name it has (tied weights have several)
    for name, p in module.named_parameters(remove_duplicate=False):
        if local_tensor(p).is_meta:
            names.setdefault(id(p), []).append(name)
    if not names:
        return 0
    stored = {pid: next((n for n in ns if n in files), None) for pid, ns in names.items()}
    missing = sorted(ns[0] for pid, ns in names.items() if stored[pid] is None)
    if missing:
        some = sorted(set(files.values()))[:2]
        raise KeyError(
            f"{', '.join(some)}: lacks {len(missing)} parameter(s) of {type(module).__name__}: {missing[:5]}"
        )
    # storage for the local part of each meta tensor only (a DTensor shard keeps its placement)
    module._apply(lambda t: torch.empty_like(t, device=device) if local_tensor(t).is_meta else t)
    params = dict(module.named_parameters(remove_duplicate=False))
    for tied in (ns for ns in names.values() if len(ns) > 1):  # Module._apply unties them: tie them again
        for name in tied[1:]:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._parameters[leaf] = params[name] = params[tied[0]]
    by_file: dict[str, list[tuple[str, str]]] = {}  # file -> (parameter name, stored key)
    for pid, key in stored.items():
        by_file.setdefault(files[key], []).append((names[pid][0], key))
    read = 0
    for file, entries in by_file.items():
        header, data_start = read_header(file)
        with open(file, "rb") as raw, safe_open(file, framework="pt", device="cpu") as f:
            for name, key in entries:
                read += _read_local(params[name], key, header[key], data_start, raw, f, file)
    return read


def _read_local(param: torch.Tensor, key: str, entry: dict, data_start: int, raw, f, file: str) -> int:
    """Read this rank's region of ``param`` (stored as ``key``) into its local storage; returns the bytes read.

    The region is read with plain file reads, one contiguous run of bytes at a time (one for a dim-0 shard, one per
    row for a dim-1 shard), straight into the local tensor when the dtype matches and it lives on the CPU, else into
    a host buffer of the local size that is then cast or copied: no mapped file pages, no whole-tensor copy.
    """
    if tuple(entry["shape"]) != tuple(param.shape):
        raise ValueError(
            f"{file}: {key} is stored with shape {tuple(entry['shape'])}, the model has {tuple(param.shape)}."
        )
    local = local_tensor(param)
    stored = _DTYPES.get(entry["dtype"])
    region = _local_region(param) or tuple(slice(0, n) for n in param.shape)
    with torch.no_grad():
        if stored is None:  # a dtype without a torch twin here: safetensors reads (and converts) the region
            part = f.get_slice(key)[region] if param.ndim else f.get_tensor(key)
            local.copy_(part.reshape(local.shape))
            return part.numel() * part.element_size()
        direct = stored == local.dtype and local.is_contiguous() and local.device.type == "cpu"
        target = local if direct else torch.empty(local.shape, dtype=stored)  # (local shape), host, stored dtype
        read = _read_region(
            raw,
            data_start + entry["data_offsets"][0],
            tuple(param.shape),
            region,
            target.view(-1).view(torch.uint8).numpy(),
            target.element_size(),
            f"{file}: {key}",
        )
        if not direct:
            local.copy_(target)  # cast and / or to the device
        return read


def _read_region(
    raw, offset: int, shape: tuple[int, ...], region: tuple[slice, ...], out, itemsize: int, what: str
) -> int:
    """Read ``region`` of a row-major tensor of ``shape`` stored at byte ``offset`` into the byte array ``out``
    (the region's elements in row-major order), one contiguous run at a time."""
    import itertools

    view = memoryview(out)
    if not shape:  # a scalar: one element
        raw.seek(offset)
        if raw.readinto(view[:itemsize]) != itemsize:
            raise ValueError(f"{what} is truncated.")
        return itemsize
    # the last cut dimension: the region is contiguous from there on (every later dimension is whole)
    cut = max((d for d, (s, n) in enumerate(zip(region, shape)) if s.start != 0 or s.stop != n), default=0)
    inner = math.prod(shape[cut + 1 :])  # elements per index of the cut dimension
    run = (region[cut].stop - region[cut].start) * inner * itemsize  # bytes of one contiguous run
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]  # row-major strides in elements
    position = 0
    for outer in itertools.product(*(range(s.start, s.stop) for s in region[:cut])):
        start = sum(i * strides[d] for d, i in enumerate(outer)) + region[cut].start * inner
        raw.seek(offset + start * itemsize)
        if raw.readinto(view[position : position + run]) != run:
            raise ValueError(f"{what} is truncated.")
        position += run
    return position


#: safetensors dtype names -> torch dtypes, for reading in place.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(file: str | Path) -> tuple[dict, int]:
    """The safetensors header (name -> dtype, shape, data_offsets) and the byte offset where data starts."""
    with open(file, "rb") as raw:
        (size,) = struct.unpack("<Q", raw.read(8))  # little-endian u64: header length
        header = json.loads(raw.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


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
