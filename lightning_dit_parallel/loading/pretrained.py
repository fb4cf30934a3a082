"""Lean ``from_pretrained``: diffusers and transformers models built on the meta device, their weights deferred.

Inside ``lean_from_pretrained()``, ``ModelMixin.from_pretrained`` (every diffusers model: transformers, VAEs,
ControlNets) and ``PreTrainedModel.from_pretrained`` (every transformers model: T5/UMT5, CLIP, Llama, Gemma,
Qwen ...) build the model from its config with its parameters on the meta device and note the safetensors files
they live in (``defer_weights``: one file, or a sharded checkpoint's ``*.safetensors.index.json``). Nothing is read
yet: the strategy parallelizes the skeleton and ``materialize`` then reads on each rank only the bytes it keeps.
``DiffusionPipeline.from_pretrained`` loads its components through these methods, so a whole pipeline loads lean.

What the skeleton cannot serve is loaded as usual, whole: another source than a local folder with safetensors
weights, a quantization config, a device map, config overrides, or a checkpoint whose keys do not match the model
(e.g. a legacy layout that the library converts on load). Persistent buffers stored in the files (small) are read
at once. The dtype follows ``from_pretrained``: ``torch_dtype`` (diffusers) / ``dtype`` (transformers) when given,
with the class's ``_keep_in_fp32_modules`` kept in float32; without one, diffusers models in the dtype they are
built in (float32) and transformers models in the dtype the weights were saved in, as the libraries load them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_dit_parallel.loading.deferred import (
    _DTYPES,
    DEFERRED_ATTR,
    DeferredWeights,
    build_on_meta,
    read_header,
    weight_files,
)

log = logging.getLogger(__name__)

#: ``from_pretrained`` arguments the lean build honours or that do not change the result; any other one (a config
#: override, a quantization config ...) is served by the library's own loading.
_HARMLESS = {
    "torch_dtype",
    "dtype",
    "variant",
    "use_safetensors",
    "low_cpu_mem_usage",
    "subfolder",
    "cache_dir",
    "local_files_only",
    "force_download",
    "proxies",
    "token",
    "disable_mmap",
    "offload_state_dict",
}
#: Arguments that may be given with their "off" value.
_OFF = {
    "device_map": (None, "cpu"),
    "max_memory": (None,),
    "offload_folder": (None,),
    "use_flashpack": (False,),
    "revision": (None, "main"),
    "quantization_config": (None,),
}

#: Weight file stems of the two libraries.
_STEMS = ("diffusion_pytorch_model", "model")


def checkpoint_files(folder: str | Path, variant: str | None = None) -> Path | None:
    """The single safetensors file or the ``*.safetensors.index.json`` of a model folder, or ``None``."""
    folder = Path(folder)
    for stem in _STEMS:
        names = (
            (f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json")
            if variant
            else (f"{stem}.safetensors", f"{stem}.safetensors.index.json")
        )
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def lean_model(cls: type, source: Any, kwargs: dict[str, Any]) -> nn.Module | None:
    """``cls`` built from the config in the local folder ``source`` (``kwargs`` as given to ``from_pretrained``)
    with its parameters on the meta device and its weights deferred; ``None`` when the lean build cannot serve
    this call exactly (the caller then loads as usual)."""
    unknown = {k for k in kwargs if k not in _HARMLESS and not (k in _OFF and kwargs[k] in _OFF[k])}
    if unknown or kwargs.get("use_safetensors") is False or not isinstance(source, (str, Path)):
        return None
    folder = Path(source) / (kwargs.get("subfolder") or "")
    checkpoint = checkpoint_files(folder, kwargs.get("variant"))
    if not folder.is_dir() or checkpoint is None:
        return None
    files = weight_files(checkpoint)
    model = build_on_meta(lambda: _from_config(cls, folder))
    dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if dtype == "auto" or (dtype is None and not _is_diffusers(cls)):
        dtype = _saved_dtype(files)  # transformers loads as saved; diffusers in the dtype the model is built in
    if isinstance(dtype, torch.dtype):
        _cast_stored(model, dtype)
    if not _covers(model, files):
        log.info(
            "%s: the checkpoint in %s does not match the model's parameters; loading it whole.", cls.__name__, folder
        )
        return None
    _read_stored_buffers(model, files)
    model.eval()
    model.__dict__[DEFERRED_ATTR] = DeferredWeights(files)
    return model


@contextmanager
def lean_from_pretrained() -> Iterator[None]:
    """Inside the block, diffusers' and transformers' ``from_pretrained`` build models on the meta device with their
    weights deferred (see the module docstring). Not thread-safe: it replaces the two classmethods meanwhile."""
    patched = []
    for cls in _model_bases():
        original = cls.__dict__["from_pretrained"]
        patched.append((cls, original))
        setattr(cls, "from_pretrained", classmethod(_lean(original.__func__)))
    try:
        yield
    finally:
        for cls, original in patched:
            setattr(cls, "from_pretrained", original)


def _lean(original):
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = None if args else lean_model(cls, pretrained_model_name_or_path, kwargs)
        return model if model is not None else original(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained.__doc__ = original.__doc__
    return from_pretrained


def _model_bases() -> list[type]:
    from diffusers import ModelMixin

    bases: list[type] = [ModelMixin]
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return bases
    return [*bases, PreTrainedModel]


def _is_diffusers(cls: type) -> bool:
    from diffusers import ModelMixin

    return issubclass(cls, ModelMixin)


def _from_config(cls: type, folder: Path) -> nn.Module:
    if _is_diffusers(cls):
        return cls.from_config(cls.load_config(folder))
    config = cls.config_class.from_pretrained(folder)
    return cls._from_config(config)


def _saved_dtype(files: dict[str, str]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor stored (``None`` when there is none)."""
    for file in dict.fromkeys(files.values()):
        header, _ = read_header(file)
        for entry in header.values():
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return None


def _cast_stored(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast what the checkpoint stores (floating parameters and persistent buffers) to ``dtype`` as the libraries
    do when loading, except the class's ``_keep_in_fp32_modules`` (diffusers: any dtype; transformers: float16 only)
    and ``_keep_in_fp32_modules_strict`` (transformers: float16 and bfloat16), matched by name component, which stay
    float32. Buffers computed in ``__init__`` and not stored (rotary tables) keep the dtype they were built in. Tied
    parameters (one tensor under several names) stay tied: a model whose checkpoint stores one of the names (T5's
    ``shared.weight`` for ``encoder.embed_tokens.weight``) still covers its parameters (``_covers``)."""
    from diffusers import ModelMixin

    keep = set()
    if dtype in (torch.float16, torch.bfloat16):
        keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        if isinstance(model, ModelMixin) or dtype == torch.float16:
            keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    cast: dict[int, torch.Tensor] = {}  # tied tensors (T5's shared and embed_tokens weights) stay one tensor
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        target = torch.float32 if keep & set(name.split(".")) else dtype
        if tensor.dtype == target:
            continue  # unchanged: the tensor itself, so that ties hold
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if id(tensor) not in cast:
            new = tensor.to(target)
            cast[id(tensor)] = (
                nn.Parameter(new, requires_grad=tensor.requires_grad) if leaf in module._parameters else new
            )
        if leaf in module._parameters:
            module._parameters[leaf] = cast[id(tensor)]
        else:
            module._buffers[leaf] = cast[id(tensor)]


def _covers(model: nn.Module, files: dict[str, str]) -> bool:
    """Whether every parameter is stored under one of its names with its shape."""
    names: dict[int, list[tuple[str, torch.Size]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append((name, p.shape))
    shapes: dict[str, tuple] = {}
    for file in dict.fromkeys(files.values()):
        header, _ = read_header(file)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
    return all(any(shapes.get(n) == tuple(s) for n, s in group) for group in names.values())


def _read_stored_buffers(model: nn.Module, files: dict[str, str]) -> None:
    """Persistent buffers stored in the checkpoint are read now (small, and every rank keeps them whole)."""
    from safetensors import safe_open

    state_keys = set(model.state_dict(keep_vars=True))
    by_file: dict[str, list[tuple[str, torch.Tensor]]] = {}  # each file opened once
    for name, buffer in model.named_buffers():
        if name in files and name in state_keys and buffer is not None:
            by_file.setdefault(files[name], []).append((name, buffer))
    for file, buffers in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f, torch.no_grad():
            for name, buffer in buffers:
                buffer.copy_(f.get_tensor(name).reshape(buffer.shape))  # cast to the buffer's dtype
