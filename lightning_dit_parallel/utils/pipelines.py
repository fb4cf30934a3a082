"""diffusers pipelines held as plain attributes of a LightningModule (``self.pipe = FluxPipeline.from_pretrained(p)``).

A ``DiffusionPipeline`` is not an ``nn.Module``, so its transformer, VAE and text encoders are invisible to the
module tree that Lightning moves to the device and that the parallelizers search for plans. While a strategy is
set up, every such attribute (directly, or inside a list or dict) is replaced by a ``PipelineModule``: an
``nn.Module`` that registers the pipeline's module components as its submodules (the same objects) and passes
calls and attribute reads on to the pipeline. So ``self.pipe(...)`` and ``self.pipe.scheduler`` in
``predict_step`` work unchanged, the components are moved and parallelized by their plans, and paths such as
``"pipe.text_encoder"`` name them (``shard_modules``). ``detach`` puts the original attributes back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


def _pipeline_class() -> type | None:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # diffusers is a dependency, but keep the strategies usable without it
        return None
    return DiffusionPipeline


def is_pipeline(value: Any) -> bool:
    """Whether ``value`` is a diffusers ``DiffusionPipeline``."""
    cls = _pipeline_class()
    return cls is not None and isinstance(value, cls)


class PipelineModule(nn.Module):
    """A diffusers pipeline seen as an ``nn.Module``: its module components are submodules, and calls and
    attribute reads go to the pipeline itself."""

    def __init__(self, pipeline: Any) -> None:
        super().__init__()
        object.__setattr__(self, "pipeline", pipeline)
        for name, component in pipeline.components.items():
            if isinstance(component, nn.Module):
                self._modules[name] = component  # not add_module: __getattr__ already finds the name on the pipeline

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.pipeline(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # the registered components
        except AttributeError:
            return getattr(self.__dict__["pipeline"], name)

    def extra_repr(self) -> str:
        return type(self.pipeline).__name__


@dataclass
class AttachedPipelines:
    """The pipeline attributes replaced on a module; ``detach()`` puts them back and restores their progress bars."""

    module: nn.Module
    originals: dict[str, Any] = field(default_factory=dict)
    progress_bars: list[tuple[Any, Any]] = field(default_factory=list)

    @property
    def pipelines(self) -> list[Any]:
        return [p for p, _ in self.progress_bars]

    def detach(self) -> None:
        for name, value in self.originals.items():
            self.module._modules.pop(name, None)
            object.__setattr__(self.module, name, value)
        self.originals.clear()
        for pipeline, config in self.progress_bars:
            if config is _UNSET:
                pipeline.__dict__.pop("_progress_bar_config", None)
            else:
                pipeline._progress_bar_config = config
        self.progress_bars.clear()


_UNSET = object()


def attach_pipelines(module: nn.Module, show_progress: bool) -> AttachedPipelines:
    """Replace every ``DiffusionPipeline`` attribute of ``module`` (directly, or as values of a list, tuple or dict
    attribute) by ``PipelineModule`` wrappers (``nn.ModuleList`` / ``nn.ModuleDict`` for containers).

    Args:
        module: usually the LightningModule.
        show_progress: whether diffusers' progress bars stay on (global rank 0 only); off on the other ranks.

    Raises:
        ValueError: for a dict of pipelines with keys that are not strings (``nn.ModuleDict`` needs them).
    """
    attached = AttachedPipelines(module)
    wrapped: dict[int, PipelineModule] = {}

    def wrap(pipeline: Any) -> PipelineModule:
        if id(pipeline) not in wrapped:
            wrapped[id(pipeline)] = PipelineModule(pipeline)
            attached.progress_bars.append((pipeline, pipeline.__dict__.get("_progress_bar_config", _UNSET)))
            if not show_progress:
                config = dict(getattr(pipeline, "_progress_bar_config", {}) or {})
                pipeline.set_progress_bar_config(**{**config, "disable": True})
        return wrapped[id(pipeline)]

    for name, value in list(vars(module).items()):
        replacement = _wrapped_value(name, value, wrap)
        if replacement is not None:
            attached.originals[name] = value
            del module.__dict__[name]
            module.add_module(name, replacement)
    return attached


def _wrapped_value(name: str, value: Any, wrap: Callable[[Any], PipelineModule]) -> nn.Module | None:
    if is_pipeline(value):
        return wrap(value)
    if isinstance(value, (list, tuple)) and value and all(is_pipeline(v) for v in value):
        return nn.ModuleList([wrap(v) for v in value])
    if isinstance(value, dict) and value and all(is_pipeline(v) for v in value.values()):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"Attribute {name!r} holds pipelines under keys {bad}; use string keys.")
        return nn.ModuleDict({k: wrap(v) for k, v in value.items()})
    return None
