"""The pipeline's models as the planner sees them: read from config files (built on the meta device) or from the
modules of a LightningModule.

From files: a transformer ``config.json``, or a pipeline folder (``model_index.json`` layout) with
``transformer/config.json`` and, when present, ``text_encoder*/config.json`` and ``vae/config.json``; a
``config.json`` inside such a folder finds its siblings too. Each model is built from its config under
``torch.device("meta")`` (diffusers' ``from_config``, transformers' config classes), so parameters are counted for
every family with a config and no weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_dit_parallel.planner.components import TextEncoderSpec, VaeSpec, text_encoder_spec, vae_spec
from lightning_dit_parallel.planner.spec import ModelSpec, model_spec


@dataclass(frozen=True)
class PipelineModels:
    """The DiT, its text encoders and its VAE.

    Args:
        dit: the planned DiT.
        text_encoders: text encoders (empty when unknown).
        vae: the VAE (``None`` when unknown: no decode peak is estimated).
        source: where they were read from (for reports).
    """

    dit: ModelSpec
    text_encoders: tuple[TextEncoderSpec, ...] = ()
    vae: VaeSpec | None = None
    source: str = ""


def read_config(path: str | Path) -> dict:
    """A JSON config file as a dict.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return data


def find_configs(path: str | Path) -> tuple[Path, list[Path], Path | None]:
    """``(transformer config, text encoder configs, VAE config)`` under a pipeline folder or next to a config.

    Raises:
        FileNotFoundError: when no transformer config is found.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "transformer" / "config.json", path / "config.json"]
        transformer = next((c for c in candidates if c.is_file()), None)
        if transformer is None:
            raise FileNotFoundError(f"{path} has neither transformer/config.json nor config.json.")
        folder = path if transformer.parent.name == "transformer" and transformer.parent.parent == path else None
    else:
        transformer = path
        parent = path.parent.parent
        folder = parent if (parent / "model_index.json").is_file() else None
    encoders: list[Path] = []
    vae: Path | None = None
    if folder is not None:
        encoders = sorted(p / "config.json" for p in folder.iterdir()
                          if p.is_dir() and p.name.startswith("text_encoder") and (p / "config.json").is_file())
        vae = folder / "vae" / "config.json" if (folder / "vae" / "config.json").is_file() else None
    return transformer, encoders, vae


def build_diffusers_model(config: dict, what: str) -> nn.Module:
    """A diffusers model from its config, on the meta device (class from ``_class_name``).

    Raises:
        ValueError: when the config names no diffusers class.
    """
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if cls is None:
        raise ValueError(
            f"The {what} config names no diffusers class (_class_name={name!r}); it is needed to build the model."
        )
    with torch.device("meta"):
        return cls.from_config(config)


def build_text_encoder(config: dict) -> nn.Module:
    """A transformers text encoder from its config, on the meta device (class from ``architectures[0]``).

    Raises:
        ValueError: when the config names no transformers architecture or model type.
    """
    import transformers

    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None or not model_type:
        raise ValueError(
            f"The text encoder config names no transformers class (architectures={architectures},"
            f" model_type={model_type!r})."
        )
    options = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    cfg = transformers.AutoConfig.for_model(model_type, **options)
    with torch.device("meta"):
        return cls(cfg)


def load_models(path: str | Path, text_encoder_configs: list[str | Path] | None = None,
                vae_config: str | Path | None = None) -> PipelineModels:
    """Read the DiT (and text encoders and VAE) of a config file or pipeline folder.

    Args:
        path: a transformer ``config.json`` or a pipeline folder.
        text_encoder_configs: text encoder ``config.json`` files (default: those found next to the transformer).
        vae_config: a VAE ``config.json`` (default: the one found next to the transformer).

    Raises:
        ValueError: when the DiT's class has no plan.
    """
    from lightning_dit_parallel.registry import HOW_TO_DECLARE, plan_for

    transformer, found_encoders, found_vae = find_configs(path)
    config = read_config(transformer)
    dit = build_diffusers_model(config, "transformer")
    plan = plan_for(dit)
    if plan is None:
        raise ValueError(f"{type(dit).__name__} has no parallel plan. {HOW_TO_DECLARE}")
    encoders = [Path(p) for p in text_encoder_configs] if text_encoder_configs is not None else found_encoders
    specs = []
    for p in encoders:
        name = p.parent.name if p.name == "config.json" else p.stem
        specs.append(text_encoder_spec(name, build_text_encoder(read_config(p))))
    vae_path = Path(vae_config) if vae_config is not None else found_vae
    vae = vae_spec(build_diffusers_model(read_config(vae_path), "VAE")) if vae_path is not None else None
    return PipelineModels(model_spec(dit, plan), tuple(specs), vae, str(path))


def models_from_module(root: nn.Module) -> PipelineModels:
    """The planned DiT of a module tree (a LightningModule), its text encoders and VAE.

    Text encoders are the ``transformers`` ``PreTrainedModel`` submodules outside the DiT; the VAE is the first
    diffusers ``AutoencoderMixin`` submodule. diffusers pipelines held as attributes are looked into.

    Raises:
        ValueError: when there is no planned DiT, or more than one (the planner sizes one model).
    """
    from lightning_dit_parallel.pipelines import attach_pipelines
    from lightning_dit_parallel.registry import find_planned_modules

    attached = attach_pipelines(root, show_progress=True)
    try:
        planned = find_planned_modules(root)
        if len(planned) > 1:
            raise ValueError(
                f"The planner sizes one DiT; {type(root).__name__} holds {len(planned)}:"
                f" {[p or type(m).__name__ for p, m, _ in planned]}. Choose the layout explicitly."
            )
        path, dit, plan = planned[0]
        encoders = [text_encoder_spec(name, module) for name, module in _text_encoders(root)]
        vae = next((vae_spec(m) for _, m in root.named_modules() if _is_vae(m)), None)
        return PipelineModels(model_spec(dit, plan), tuple(encoders), vae, path or type(dit).__name__)
    finally:
        attached.detach()


def _text_encoders(root: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    found: list[tuple[str, nn.Module]] = []
    for path, module in root.named_modules():
        if isinstance(module, PreTrainedModel) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, module))
    return found


def _is_vae(module: nn.Module) -> bool:
    try:
        from diffusers.models.autoencoders.vae import AutoencoderMixin
    except ImportError:
        return False
    return isinstance(module, AutoencoderMixin)
