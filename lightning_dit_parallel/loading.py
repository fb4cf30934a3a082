"""Memory-lean loading: build on the meta device, parallelize, then read from safetensors only what a rank keeps.

With FSDP or pipeline sharding a rank never needs the whole model. The flow:

1. ``build_on_meta(build)`` constructs the model with its parameters on the meta device (no memory; buffers,
   which are small and often computed in ``__init__``, stay real);
2. ``defer_weights(model, "model.safetensors")`` notes where the weights are;
3. the strategy parallelizes (FSDP turns parameters into Shard(0) DTensors, a pipeline stage releases the
   blocks it does not own) and then calls ``materialize``: every parameter still on the meta device gets
   storage for this rank's part only, filled from the file with ``safe_open(...).get_slice`` so that no
   rank reads (or maps) more than its own rows.

Without any parallelism ``materialize`` loads the whole model, so one code path serves one process too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import nn

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
    pending = {name: p for name, p in module.named_parameters() if _local(p).is_meta}
    if not pending:
        return 0
    # storage for the local part of each meta tensor only (a DTensor shard keeps its placement)
    module._apply(lambda t: torch.empty_like(t, device=device) if _local(t).is_meta else t)
    params = dict(module.named_parameters())
    read = 0
    with safe_open(str(file), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = sorted(set(pending) - keys)
        if missing:
            raise KeyError(f"{file} lacks {len(missing)} parameter(s) of {type(module).__name__}: {missing[:5]}")
        for name in pending:
            param = params[name]
            stored = f.get_slice(name)
            if tuple(stored.get_shape()) != tuple(param.shape):
                raise ValueError(f"{file}: {name} is stored with shape {stored.get_shape()}, the model has {tuple(param.shape)}.")
            local = _local(param)
            region = _local_region(param)
            # read only this rank's rows: (n, ...) on disk -> (local n, ...) in memory
            part = stored[region] if region is not None else stored[:]
            with torch.no_grad():
                local.copy_(part.reshape(local.shape))
            read += part.numel() * part.element_size()
    return read


def save_weights(module: nn.Module, file: str | Path) -> None:
    """Write ``module.state_dict()`` to a safetensors file (tensors made contiguous, tied ones cloned)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(file))


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _local_region(param: torch.Tensor) -> tuple[slice, ...] | None:
    """Slices of the global tensor that this rank's shard covers, or ``None`` for a plain tensor."""
    if not hasattr(param, "placements"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))
