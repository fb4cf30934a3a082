"""``PipelineSampler``: a LightningModule over any diffusers pipeline, loaded from disk or given as an object.

A batch is ``{"index": LongTensor (B,), "prompt": list[str]}`` plus optionally ``"negative_prompt"`` and further
per-request keyword arguments of the pipeline. Sample ``i`` is generated with
``torch.Generator("cpu").manual_seed(seed + i)``, so the image for prompt ``i`` equals what plain diffusers gives
for ``pipe(prompt=p_i, generator=torch.Generator("cpu").manual_seed(seed + i), **call)`` on one device, whatever
the parallel layout and the batch size.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_dit_parallel.loading import lean_from_pretrained, materialize

#: Batch keys the sampler reads itself; every other key is passed to the pipeline as a per-request argument.
RESERVED_KEYS = ("index", "prompt", "negative_prompt")

#: Call arguments the sampler sets itself.
OWN_CALL_ARGUMENTS = ("prompt", "negative_prompt", "generator", "output_type", "return_dict")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.float16"`` / a ``torch.dtype`` / ``None`` -> ``torch.dtype`` or ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"torch_dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16', 'float16').")
    return value


def load_pipeline(
    path: str | Path,
    torch_dtype: str | torch.dtype | None = None,
    variant: str | None = None,
    pipeline_class: str | None = None,
    **kwargs: Any,
):
    """``DiffusionPipeline.from_pretrained`` from a local folder (or ``pipeline_class``, a dotted import path or a
    diffusers class name, for a folder whose ``model_index.json`` names another class)."""
    import diffusers

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json).")
    cls = diffusers.DiffusionPipeline
    if pipeline_class:
        module_name, _, name = pipeline_class.rpartition(".")
        cls = getattr(importlib.import_module(module_name) if module_name else diffusers, name)
    options = {"torch_dtype": resolve_dtype(torch_dtype), **kwargs}
    if variant is not None:
        options["variant"] = variant
    return cls.from_pretrained(str(folder), **options)


class PipelineSampler(L.LightningModule):
    """Samples with a diffusers pipeline inside ``Trainer.predict``.

    Args:
        pipeline: a ``DiffusionPipeline`` object; or leave ``None`` and give ``path``.
        path: a local pipeline folder (``save_pretrained`` layout) to load with ``from_pretrained``, lean: every
            model component is built on the meta device and, under a parallel strategy, each rank reads from its
            safetensors files only the part it keeps (its FSDP shard, pipeline stage or tensor-parallel shard;
            replicated components whole). See ``lightning_dit_parallel.loading``.
        torch_dtype: dtype to load with, e.g. ``"bfloat16"`` (default: as saved).
        variant: weight variant to load, e.g. ``"fp16"``.
        pipeline_class: a diffusers class name or dotted path to load with instead of ``DiffusionPipeline``.
        call: keyword arguments of every pipeline call (``num_inference_steps``, ``guidance_scale``, ``height``,
            ``width``, ``num_frames`` ...). ``prompt``, ``negative_prompt``, ``generator``, ``output_type`` and
            ``return_dict`` are set by the sampler. ``None`` values are left out (the pipeline's default applies).
        seed: sample ``i`` uses ``torch.Generator("cpu").manual_seed(seed + i)``.

    ``predict_step`` returns images ``(B, C, H, W)`` or videos ``(B, F, C, H, W)``, float32 in [0, 1].
    """

    def __init__(
        self,
        pipeline: Any = None,
        path: str | Path | None = None,
        torch_dtype: str | torch.dtype | None = None,
        variant: str | None = None,
        pipeline_class: str | None = None,
        call: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (pipeline is None) == (path is None):
            raise ValueError("Give PipelineSampler either a pipeline object or a path to load one from (not both).")
        call = dict(call or {})
        own = sorted(set(call) & set(OWN_CALL_ARGUMENTS))
        if own:
            raise ValueError(f"call arguments {own} are set by PipelineSampler (prompts come from the batch).")
        call = {k: v for k, v in call.items() if v is not None}
        if pipeline is not None and (torch_dtype is not None or variant is not None or pipeline_class is not None):
            raise ValueError(
                "torch_dtype, variant and pipeline_class apply to loading from a path, not to a pipeline object."
            )
        if pipeline is None:
            # lean: the components are built on the meta device; a parallel strategy reads on each rank only what it
            # keeps (after parallelizing), any other use reads them whole before the first call (``ensure_loaded``)
            with lean_from_pretrained():
                pipeline = load_pipeline(path, torch_dtype, variant, pipeline_class)
        self.pipe = pipeline
        self.call = call
        self.seed = int(seed)

    def generators(self, indices: Tensor) -> list[torch.Generator]:
        """One CPU generator per sample, seeded from its global index."""
        return [torch.Generator("cpu").manual_seed(self.seed + int(i)) for i in indices.reshape(-1).tolist()]

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        for key in ("index", "prompt"):
            if key not in batch:
                raise ValueError(f"PipelineSampler batches need {key!r}; this one has {sorted(batch)}.")
        indices = torch.as_tensor(batch["index"]).reshape(-1)
        prompts = _as_list(batch["prompt"], len(indices), "prompt")
        negatives = (
            _as_list(batch["negative_prompt"], len(indices), "negative_prompt") if "negative_prompt" in batch else None
        )
        extras = {k: v for k, v in batch.items() if k not in RESERVED_KEYS}
        generators = self.generators(indices)
        ensure_loaded(self.pipe)
        if _uniform(extras, len(indices)):
            shared = {k: _first(v) for k, v in extras.items()}
            return self._generate(prompts, negatives, generators, shared)
        # requests that differ in a call argument are generated one by one
        outputs = [
            self._generate(
                [prompts[i]],
                None if negatives is None else [negatives[i]],
                [generators[i]],
                {k: _item(v, i) for k, v in extras.items()},
            )
            for i in range(len(indices))
        ]
        return torch.cat(outputs)

    def _generate(self, prompts, negatives, generators, extras: dict) -> Tensor:
        arguments = {**self.call, **extras, "prompt": prompts, "generator": generators, "output_type": "pt"}
        if negatives is not None:
            arguments["negative_prompt"] = negatives
        result = self.pipe(**arguments)
        for name in ("images", "frames", "videos"):
            output = getattr(result, name, None)
            if isinstance(output, Tensor):
                return output.float()
        raise TypeError(
            f"{type(self.pipe).__name__} returned {type(result).__name__} without an image or video tensor."
        )


def ensure_loaded(pipe: Any) -> None:
    """Read whole the deferred weights of ``pipe``'s components that no parallel strategy has read (a lean-loaded
    pipeline used in one process, or outside ``Trainer.predict``), onto the device of the component's buffers."""
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            materialize(component, _host_device(component))


def _host_device(module: torch.nn.Module) -> torch.device:
    for tensor in (*module.buffers(), *module.parameters()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _as_list(value: Any, n: int, key: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"batch[{key!r}] has {len(values)} entries for {n} samples.")
    return values


def _first(value: Any) -> Any:
    if isinstance(value, Tensor):
        item = value[0]
        return item.item() if item.ndim == 0 else item
    return value[0] if isinstance(value, (list, tuple)) else value


def _item(value: Any, i: int) -> Any:
    if isinstance(value, Tensor):
        item = value[i]
        return item.item() if item.ndim == 0 else item
    return value[i] if isinstance(value, (list, tuple)) else value


def _uniform(extras: Mapping[str, Any], n: int) -> bool:
    """Whether every per-request argument has one value for the whole batch."""
    for value in extras.values():
        items = [_item(value, i) for i in range(n)]
        if any(not _same(items[0], x) for x in items[1:]):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b
