"""The pipeline's models as the planner sees them: read from a pipeline folder (headers and configs, never the
weights) or from the modules of a LightningModule.

From files: a transformer ``config.json``, or a pipeline folder whose ``model_index.json`` names its components
(``transformer``, ``transformer_2``, ``text_encoder*``, ``image_encoder``, ``vae``, ControlNets ...); a
``config.json`` inside such a folder finds its siblings too. A component is counted from the headers of its
safetensors files where present (exact: every tensor's shape), else from its config built under
``torch.device("meta")`` (diffusers' ``from_config``, transformers' config classes), else from the ``total_size`` of
its ``*.safetensors.index.json``. DiTs are always built from their configs on the meta device (their plans need the
modules), so no weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lightning_dit_parallel.planner.components import (
    EncoderKind,
    EncoderSpec,
    OtherSpec,
    VaeSpec,
    encoder_spec,
    text_encoder_spec,
    vae_spec,
)
from lightning_dit_parallel.planner.spec import ModelSpec, model_spec
from lightning_dit_parallel.planner.weights import (
    WeightFiles,
    component_weights,
    stored_element,
    units_from_names,
    units_from_tensors,
)


@dataclass(frozen=True)
class PipelineModels:
    """The DiT(s), the encoders, the VAE and the other components of a pipeline.

    Args:
        dit: the planned DiT (``transformer``); layouts are enumerated for it.
        text_encoders: text encoders (empty when unknown).
        vae: the VAE (``None`` when unknown: no decode peak is estimated).
        source: where they were read from (for reports).
        more_dits: further planned DiTs the pipeline holds (``transformer_2`` ...: Wan 2.2's second expert). Every
            rank holds them too, cut by the same layout as ``dit``; one DiT runs at a time.
        dit_names: component names of ``dit`` and ``more_dits``, in order (default ``transformer``,
            ``transformer_2`` ...).
        image_encoders: image encoders (``image_encoder``: CLIP vision for image-to-video).
        others: components counted by their parameters only, held whole (ControlNets ...).
        notes: what could not be counted, or disagrees (for reports).
        counted_from: ``(component name, how its parameters were counted)`` (for reports).
    """

    dit: ModelSpec
    text_encoders: tuple[EncoderSpec, ...] = ()
    vae: VaeSpec | None = None
    source: str = ""
    more_dits: tuple[ModelSpec, ...] = ()
    dit_names: tuple[str, ...] = ()
    image_encoders: tuple[EncoderSpec, ...] = ()
    others: tuple[OtherSpec, ...] = ()
    notes: tuple[str, ...] = ()
    counted_from: tuple[tuple[str, str], ...] = ()

    @property
    def dits(self) -> tuple[tuple[str, ModelSpec], ...]:
        """``(component name, spec)`` of every DiT, ``dit`` first."""
        specs = (self.dit, *self.more_dits)
        names = [*self.dit_names[: len(specs)]]
        names += ["transformer" if i == 0 else f"transformer_{i + 1}" for i in range(len(names), len(specs))]
        return tuple(zip(names, specs))

    @property
    def encoders(self) -> tuple[EncoderSpec, ...]:
        """Text encoders, then image encoders."""
        return (*self.text_encoders, *self.image_encoders)


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
        encoders = sorted(
            p / "config.json"
            for p in folder.iterdir()
            if p.is_dir() and p.name.startswith("text_encoder") and (p / "config.json").is_file()
        )
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


#: Class-name endings of the pipeline parts that hold no weights (not counted, not noted when absent).
_NOT_MODELS = ("Scheduler", "Tokenizer", "TokenizerFast", "Processor", "FeatureExtractor", "ImageProcessor")


@dataclass(frozen=True)
class Component:
    """One entry of a pipeline folder.

    Args:
        name: its name in ``model_index.json`` (and its subfolder).
        library: ``"diffusers"``, ``"transformers"`` ...
        cls: its class name.
        folder: its subfolder.
    """

    name: str
    library: str
    cls: str
    folder: Path

    @property
    def config(self) -> Path | None:
        path = self.folder / "config.json"
        return path if path.is_file() else None

    @property
    def role(self) -> str:
        return component_role(self.name, self.cls)


def component_role(name: str, cls: str) -> str:
    """What the planner does with a component, by its name in ``model_index.json`` (and its class):
    ``"dit"`` (``transformer``, ``transformer_2`` ...), ``"text_encoder"`` (``text_encoder``, ``text_encoder_2``
    ...), ``"image_encoder"``, ``"vae"``, or ``"other"`` (ControlNets and the rest: parameters held whole)."""
    lower = name.lower()
    if "controlnet" in lower or "controlnet" in cls.lower():
        return "other"
    if lower.startswith("text_encoder"):
        return "text_encoder"
    if lower.startswith("image_encoder"):
        return "image_encoder"
    if lower.startswith("vae") or cls.startswith("Autoencoder"):
        return "vae"
    if lower.startswith("transformer"):
        return "dit"
    return "other"


def _natural(name: str) -> tuple:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if head and tail.isdigit() else (name, 1)


def pipeline_components(folder: str | Path) -> tuple[list[Component], list[str]]:
    """Every component of a pipeline folder that has a ``config.json`` or weights, and notes on the models
    ``model_index.json`` names whose subfolder is missing.

    From ``model_index.json`` (component name -> ``[library, class]``; ``[null, null]`` entries are absent
    components); without one, every subfolder with a ``config.json`` (class from ``_class_name`` or
    ``architectures``).
    """
    folder = Path(folder)
    found: list[Component] = []
    notes: list[str] = []
    index = folder / "model_index.json"
    if index.is_file():
        for name, value in read_config(index).items():
            if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
                continue
            library, cls = value
            if library is None or cls is None:
                continue
            sub = folder / name
            if (
                (sub / "config.json").is_file()
                or any(sub.glob("*.safetensors"))
                or any(sub.glob("*.safetensors.index.json"))
            ):
                found.append(Component(name, str(library), str(cls), sub))
            elif not sub.is_dir() and not str(cls).endswith(_NOT_MODELS):
                notes.append(f"{name} ({cls}): named in model_index.json but {sub} is missing; not counted")
    else:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()):
            config = read_config(sub / "config.json")
            if config.get("_class_name"):
                found.append(Component(sub.name, "diffusers", str(config["_class_name"]), sub))
            elif config.get("architectures"):
                found.append(Component(sub.name, "transformers", str(config["architectures"][0]), sub))
    return sorted(found, key=lambda c: _natural(c.name)), notes


def _locate(path: Path) -> tuple[Path | None, Path]:
    """``(pipeline folder or None, the planned transformer's config.json)``.

    Raises:
        FileNotFoundError: when no transformer config is found.
    """
    if path.is_dir():
        if (path / "transformer" / "config.json").is_file():
            return path, path / "transformer" / "config.json"
        if (path / "config.json").is_file():
            return None, path / "config.json"
        if (path / "model_index.json").is_file():
            dits = [c for c in pipeline_components(path)[0] if c.role == "dit" and c.config is not None]
            if dits:
                return path, dits[0].config
        raise FileNotFoundError(f"{path} has neither transformer/config.json nor config.json.")
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    parent = path.parent.parent
    return (parent if (parent / "model_index.json").is_file() else None), path


def _weights(folder: Path, notes: list[str], name: str) -> WeightFiles | None:
    try:
        return component_weights(folder)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        notes.append(f"{name}: its weight files could not be read ({exc}); counted from its config")
        return None


def _dit(component_name: str, config_path: Path, notes: list[str], counted: dict[str, str]):
    """``(module, plan)`` of a transformer config on the meta device (``plan`` ``None`` without one)."""
    from lightning_dit_parallel.registry import plan_for

    module = build_diffusers_model(read_config(config_path), "transformer")
    plan = plan_for(module)
    numel = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    weights = _weights(config_path.parent, notes, component_name)
    how = "its config"
    if weights is not None:
        stored = (
            weights.numel if weights.numel is not None else weights.nbytes // stored_element(read_config(config_path))
        )
        if abs(stored - numel) > 0.005 * numel:
            notes.append(
                f"{component_name}: its config builds {numel / 1e9:.3f} B parameters, its weights"
                f" ({weights.describe()}) hold {stored / 1e9:.3f} B; the config's shapes are used"
            )
        else:
            how += f", matching {weights.describe()}"
    counted[component_name] = how
    return module, plan


def _split_table(config: dict) -> set[str] | None:
    """The parameter names of the token table a sharded encoder of ``config`` splits by rows (``fsdp.vocab_tables``
    of the encoder built on the meta device; empty: it has none), or ``None`` where transformers cannot build it
    (the tables are then recognized by their names)."""
    from lightning_dit_parallel.parallel.fsdp import vocab_tables

    try:
        module = build_text_encoder(config)
    except Exception:  # noqa: BLE001 -- any config transformers cannot build: tables recognized by their names
        return None
    tables = vocab_tables(module, 2)
    if not tables:
        return set()
    weight = tables[0].weight
    return {n for n, p in module.named_parameters(remove_duplicate=False) if p is weight}


def _encoder(c: Component, kind: EncoderKind, notes: list[str], counted: dict[str, str]) -> EncoderSpec | None:
    """An encoder from its weights' headers (exact) where present, else from its config on the meta device, else from
    an index's ``total_size``."""
    config = read_config(c.config) if c.config is not None else {}
    weights = _weights(c.folder, notes, c.name)
    if weights is not None and weights.tensors is not None:
        counted[c.name] = weights.describe()
        return encoder_spec(c.name, c.cls, config, units_from_tensors(weights.tensors, _split_table(config)), kind)
    try:
        spec = text_encoder_spec(c.name, build_text_encoder(config), kind)
        counted[c.name] = "its config"
        return spec
    except Exception as exc:  # noqa: BLE001 -- any config transformers cannot build: count from the files
        if weights is not None:
            element = stored_element(config)
            counted[c.name] = f"{weights.describe()} ({element} bytes per stored element)"
            return encoder_spec(c.name, c.cls, config, units_from_names(weights.names, weights.nbytes // element), kind)
        notes.append(f"{c.name} ({c.cls}): not counted: no weights and its config cannot be built ({exc})")
        return None


def _module_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _other(c: Component, notes: list[str], counted: dict[str, str]) -> OtherSpec | None:
    """A component counted by its parameters only: its weights' headers, else its config, else an index total."""
    config = read_config(c.config) if c.config is not None else {}
    weights = _weights(c.folder, notes, c.name)
    if weights is not None and weights.numel is not None:
        counted[c.name] = weights.describe()
        return OtherSpec(c.name, c.cls, weights.numel)
    try:
        module = build_diffusers_model(config, c.name) if config.get("_class_name") else build_text_encoder(config)
        counted[c.name] = "its config"
        return OtherSpec(c.name, c.cls, _module_numel(module))
    except Exception as exc:  # noqa: BLE001
        if weights is not None:
            element = stored_element(config)
            counted[c.name] = f"{weights.describe()} ({element} bytes per stored element)"
            return OtherSpec(c.name, c.cls, weights.nbytes // element)
        notes.append(f"{c.name} ({c.cls}): not counted: no weights and its config cannot be built ({exc})")
        return None


def _vae(config_path: Path, name: str, notes: list[str], counted: dict[str, str]) -> VaeSpec | None:
    spec = vae_spec(build_diffusers_model(read_config(config_path), "VAE"))
    weights = _weights(config_path.parent, notes, name)
    if weights is not None and weights.numel is not None:
        counted[name] = weights.describe()
        return replace(spec, numel=weights.numel)
    counted[name] = "its config"
    return spec


def load_models(
    path: str | Path, text_encoder_configs: list[str | Path] | None = None, vae_config: str | Path | None = None
) -> PipelineModels:
    """Read the DiT(s), encoders, VAE and other components of a config file or pipeline folder.

    A pipeline folder's components come from its ``model_index.json`` (see ``pipeline_components``): every
    transformer (``transformer``, ``transformer_2`` ...: the first is planned, the others are held the same way),
    every text encoder, the image encoder, the VAE and the rest (ControlNets ...). Parameters are counted from the
    headers of a component's safetensors files where present (exact, nothing but the headers is read), else from its
    config built on the meta device, else from an index's ``total_size``. A DiT is always built from its config (its
    plan needs the modules); its weight files are only compared with it.

    Args:
        path: a transformer ``config.json``, a pipeline folder, or a folder with a transformer ``config.json``.
        text_encoder_configs: text encoder ``config.json`` files (default: those of the pipeline folder).
        vae_config: a VAE ``config.json`` (default: the pipeline folder's).

    Raises:
        ValueError: when the DiT's class has no plan.
        FileNotFoundError: when there is no transformer config.
    """
    from lightning_dit_parallel.registry import HOW_TO_DECLARE

    path = Path(path)
    folder, primary = _locate(path)
    notes: list[str] = []
    counted: dict[str, str] = {}
    components, missing = pipeline_components(folder) if folder is not None else ([], [])
    notes += missing
    primary_name = primary.parent.name if folder is not None else "transformer"
    dit, plan = _dit(primary_name, primary, notes, counted)
    if plan is None:
        raise ValueError(f"{type(dit).__name__} has no parallel plan. {HOW_TO_DECLARE}")
    main = model_spec(dit, plan)
    del dit
    more: list[ModelSpec] = []
    names = [primary_name]
    others: list[OtherSpec] = []
    text: list[EncoderSpec] = []
    image: list[EncoderSpec] = []
    vae: VaeSpec | None = None
    for c in components:
        role = c.role
        if c.folder == primary.parent:
            continue
        if role == "dit" and c.config is not None:
            module, dit_plan = _dit(c.name, c.config, notes, counted)
            if dit_plan is not None:
                more.append(model_spec(module, dit_plan))
                names.append(c.name)
            else:
                others.append(OtherSpec(c.name, c.cls, _module_numel(module)))
                notes.append(f"{c.name} ({c.cls}) has no parallel plan: held whole on every rank")
        elif role in ("text_encoder", "image_encoder"):
            if role == "text_encoder" and text_encoder_configs is not None:
                continue
            spec = _encoder(c, "text" if role == "text_encoder" else "image", notes, counted)
            if spec is not None:
                (text if role == "text_encoder" else image).append(spec)
        elif role == "vae" and vae is None and vae_config is None and c.config is not None:
            try:
                vae = _vae(c.config, c.name, notes, counted)
            except ValueError as exc:
                other = _other(c, notes, counted)
                others += [other] if other is not None else []
                notes.append(f"{c.name}: no decode estimate ({exc})")
        else:
            other = _other(c, notes, counted)
            others += [other] if other is not None else []
    for p in text_encoder_configs or []:
        p = Path(p)
        name = p.parent.name if p.name == "config.json" else p.stem
        config = read_config(p)
        c = Component(name, "transformers", str((config.get("architectures") or [""])[0]), p.parent)
        spec = _encoder(c, "text", notes, counted) if p.name == "config.json" else None
        if spec is None:
            spec = text_encoder_spec(name, build_text_encoder(config))
            counted[name] = "its config"
        text.append(spec)
    if vae_config is not None:
        vae = _vae(Path(vae_config), "vae", notes, counted)
    return PipelineModels(
        main,
        tuple(text),
        vae,
        str(path),
        tuple(more),
        tuple(names),
        tuple(image),
        tuple(others),
        tuple(notes),
        tuple(counted.items()),
    )


def models_from_module(root: nn.Module) -> PipelineModels:
    """The planned DiT(s) of a module tree (a LightningModule), its encoders, VAE and other models.

    Every outermost planned submodule is a DiT (the first is planned for, the others are held the same way: Wan 2.2's
    ``transformer_2``). Encoders are the ``transformers`` ``PreTrainedModel`` submodules outside the DiTs: image
    encoders where the path names an image encoder or the class is a vision model, text encoders otherwise. The VAE
    is the first diffusers ``AutoencoderMixin`` submodule; other diffusers models (ControlNets ...) are held whole.
    diffusers pipelines held as attributes are looked into.

    Raises:
        ValueError: when there is no planned DiT.
    """
    from lightning_dit_parallel.registry import find_planned_modules
    from lightning_dit_parallel.utils.pipelines import attach_pipelines

    attached = attach_pipelines(root, show_progress=True)
    try:
        planned = find_planned_modules(root)
        specs = [model_spec(dit, plan) for _, dit, plan in planned]
        names = [path or type(dit).__name__ for path, dit, _ in planned]
        encoders = [
            text_encoder_spec(name, module, "image" if _is_image_encoder(name, module) else "text")
            for name, module in _text_encoders(root)
        ]
        vae_path, vae_module = next(((p, m) for p, m in root.named_modules() if _is_vae(m)), ("", None))
        vae = vae_spec(vae_module) if vae_module is not None else None
        taken = [p for p, _, _ in planned] + [name for name, _ in _text_encoders(root)] + ([vae_path] if vae else [])
        others = [OtherSpec(path, type(m).__name__, _module_numel(m)) for path, m in _other_models(root, taken)]
        return PipelineModels(
            specs[0],
            tuple(e for e in encoders if e.kind == "text"),
            vae,
            names[0],
            tuple(specs[1:]),
            tuple(names),
            tuple(e for e in encoders if e.kind == "image"),
            tuple(others),
        )
    finally:
        attached.detach()


def _is_image_encoder(path: str, module: nn.Module) -> bool:
    return "image_encoder" in path.rsplit(".", 1)[-1] or "Vision" in type(module).__name__


def _within(path: str, outer: str) -> bool:
    return path == outer or outer == "" or path.startswith(outer + ".")


def _other_models(root: nn.Module, taken: list[str]) -> list[tuple[str, nn.Module]]:
    """The outermost diffusers models outside the DiTs, encoders and VAE (ControlNets ...)."""
    try:
        from diffusers import ModelMixin
    except ImportError:
        return []
    found: list[tuple[str, nn.Module]] = []
    for path, module in root.named_modules():
        if not path or any(_within(path, t) or _within(t, path) for t in taken):
            continue
        if any(_within(path, p) for p, _ in found):
            continue
        if isinstance(module, ModelMixin) and not _is_vae(module):
            found.append((path, module))
    return found


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
