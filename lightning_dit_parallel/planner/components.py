"""The other components of a pipeline, as the planner sees them: text and image encoders, the VAE, and anything
else with weights (ControlNets ...).

Encoders and the VAE are read from modules (real or on the meta device) or, for encoders, from a config and the
tensor names of their weight files: parameter shapes, the FSDP units the package would cut (the layers of the
outermost ``nn.ModuleList``s, see ``fsdp.module_units``), the widths that size their activations, and for the VAE
its compression factors and the widest activation of its decoder at full resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lightning_dit_parallel.planner.spec import Unit, linear_parameters, unit_of

EncoderKind = Literal["text", "image"]


@dataclass(frozen=True)
class EncoderSpec:
    """A text or image encoder.

    Args:
        name: its component name (``text_encoder``, ``text_encoder_2``, ``image_encoder`` ...).
        cls: class name.
        units: its FSDP units: one per layer of its outermost ``nn.ModuleList``s, then the rest (``"root"``).
        hidden: width of its token states.
        mlp: widest per-token projection.
        heads: attention heads.
        max_tokens: the most tokens it reads (``max_position_embeddings``; 0: no limit, e.g. T5's relative
            positions); for an image encoder, the tokens of one image (patches plus class token).
        kind: ``"text"`` (encodes the prompts, the negative ones too with CFG) or ``"image"`` (encodes the
            conditioning image once per sample).
    """

    name: str
    cls: str
    units: tuple[Unit, ...]
    hidden: int
    mlp: int
    heads: int
    max_tokens: int = 0
    kind: EncoderKind = "text"

    @property
    def numel(self) -> int:
        return sum(u.numel for u in self.units)


#: The name the planner used before image encoders were counted; every encoder is an ``EncoderSpec``.
TextEncoderSpec = EncoderSpec


@dataclass(frozen=True)
class OtherSpec:
    """A component the planner counts by its parameters only, held whole on every rank (a ControlNet, or a model it
    has no role for).

    Args:
        name: component name.
        cls: class name.
        numel: parameters.
    """

    name: str
    cls: str
    numel: int


@dataclass(frozen=True)
class VaeSpec:
    """A VAE.

    Args:
        cls: class name.
        numel: parameters.
        spatial: spatial compression (pixels per latent row/column).
        temporal: temporal compression (frames per latent frame; 1 for images).
        latent_channels: channels of the latent.
        decoder: the decoder's widths and work (``DecoderProfile``).
        out_channels: channels of the decoded image.
        bands: whether the package can decode it in bands (a parallel VAE: its class has a ``VaeCut``).
    """

    cls: str
    numel: int
    spatial: int
    temporal: int
    latent_channels: int
    decoder: DecoderProfile
    out_channels: int = 3
    bands: bool = False


def text_encoder_spec(name: str, module: nn.Module, kind: EncoderKind = "text") -> EncoderSpec:
    """Read an ``EncoderSpec`` from an encoder module (``transformers`` models or any ``nn.Module``)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    embeddings = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    default_hidden = max((e.embedding_dim for e in embeddings), default=0)
    default_mlp = max((m.out_features for m in linears), default=0)
    return encoder_spec(
        name,
        type(module).__name__,
        getattr(module, "config", None),
        encoder_units(module),
        kind,
        default_hidden,
        default_mlp,
    )


def encoder_spec(
    name: str,
    cls: str,
    config: Any,
    units: tuple[Unit, ...],
    kind: EncoderKind = "text",
    default_hidden: int = 0,
    default_mlp: int = 0,
) -> EncoderSpec:
    """An ``EncoderSpec`` from a config (a dict or a ``transformers`` config object; a nested ``vision_config`` or
    ``text_config`` is read for the encoder's kind) and its units.

    An image encoder's tokens are ``(image_size // patch_size) ** 2 + 1`` (patches and class token, CLIP's vision
    tower) where the config has both sizes, else its ``max_position_embeddings``.
    """
    config = _nested(config, "vision_config" if kind == "image" else "text_config")

    def read(*keys: str, default: int = 0) -> int:
        for key in keys:
            value = _get(config, key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return default

    hidden = read("d_model", "hidden_size", "width", default=default_hidden)
    mlp = read("d_ff", "intermediate_size", default=default_mlp or hidden)
    heads = read("num_heads", "num_attention_heads", default=1)
    tokens = read("max_position_embeddings")
    if kind == "image":
        image, patch = read("image_size"), read("patch_size")
        if image and patch:
            tokens = (image // patch) ** 2 + 1
    return EncoderSpec(name, cls, units, hidden, max(mlp, hidden), heads, tokens, kind)


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _nested(config: Any, key: str) -> Any:
    """``config[key]`` where the config nests the encoder's own settings there (a full CLIP config), else itself."""
    inner = _get(config, key)
    if inner is not None and _get(config, "hidden_size") is None and _get(config, "d_model") is None:
        return inner
    return config


def encoder_units(module: nn.Module) -> tuple[Unit, ...]:
    """FSDP units as ``fsdp.module_units`` cuts them: each layer of the outermost ``nn.ModuleList``s, then the rest."""
    from lightning_dit_parallel.parallel.fsdp import module_units, vocab_tables

    seen: set[int] = set()
    streamed = linear_parameters(module)
    split = {id(m.weight) for m in vocab_tables(module, 2)}  # the token table, split by rows when sharded
    units: list[Unit] = []
    layers = module_units(module)[:-1]
    for index, layer in enumerate(layers):
        params = []
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        units.append(unit_of("block", index, params, streamed, split=split))
    rest = []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    return (unit_of("root", -1, rest, streamed, split=split), *units)


def vae_spec(module: nn.Module) -> VaeSpec:
    """Read a ``VaeSpec`` from a diffusers VAE (its config for the compression factors, its decoder for widths)."""
    config = dict(getattr(module, "config", {}) or {})
    spatial, temporal = vae_compression(config)
    latent = config.get("latent_channels", config.get("z_dim", 0))
    numel = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    decoder = getattr(module, "decoder", module)
    return VaeSpec(
        cls=type(module).__name__,
        numel=numel,
        spatial=spatial,
        temporal=temporal,
        latent_channels=int(latent or 0),
        decoder=decoder_profile(decoder),
        out_channels=int(config.get("out_channels", 3) or 3),
        bands=_has_cut(module),
    )


def _has_cut(module: nn.Module) -> bool:
    from lightning_dit_parallel.registry import vae_cut_for

    return vae_cut_for(module) is not None


def vae_compression(config: dict) -> tuple[int, int]:
    """``(spatial, temporal)`` compression of a VAE from its diffusers config.

    Reads explicit factors where the config has them (``spatial_compression_ratio``, ``scale_factor_spatial`` ...),
    else counts the levels: ``2 ** (len(block_out_channels) - 1)`` spatially (AutoencoderKL), ``2 ** (len(dim_mult)
    - 1)`` and one factor 2 per ``temperal_downsample``/``temporal_downsample`` entry that is true (AutoencoderKLWan).
    """
    spatial = _first_int(config, "spatial_compression_ratio", "scale_factor_spatial", "spatial_downsample_factor")
    temporal = _first_int(config, "temporal_compression_ratio", "scale_factor_temporal", "temporal_downsample_factor")
    if spatial is None:
        levels = config.get("block_out_channels") or config.get("dim_mult")
        spatial = 2 ** (len(levels) - 1) if levels else 8
    if temporal is None:
        flags = config.get("temperal_downsample", config.get("temporal_downsample"))
        temporal = 2 ** sum(bool(f) for f in flags) if isinstance(flags, (list, tuple)) else 1
    return int(spatial), int(temporal)


@dataclass(frozen=True)
class DecoderProfile:
    """What sizes a decode, from the decoder's convolutions.

    Args:
        full_res_channels: the widest convolution from the last upsampler on (full resolution).
        macs_per_pixel: multiply-adds of all convolutions per output pixel (lower levels weighted by their share of
            the pixels).
    """

    full_res_channels: int
    macs_per_pixel: float


def decoder_profile(decoder: nn.Module) -> DecoderProfile:
    """Walk the decoder's convolutions in definition order, counting upsamplers to know each one's resolution.

    Upsamplers are found by class name (``Upsample2D``, ``WanResample`` in an upsampling mode, ...). Without one,
    every convolution counts as full resolution (a conservative figure).
    """
    convs: list[tuple[int, nn.Module]] = []
    ups = 0
    for _, module in decoder.named_modules():
        name = type(module).__name__
        if "Upsampl" in name or ("Resample" in name and "up" in str(getattr(module, "mode", "")).lower()):
            ups += 1
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            convs.append((ups, module))
    total = ups
    full = [max(m.in_channels, m.out_channels) for level, m in convs if level == total] or [1]
    macs = 0.0
    for level, m in convs:
        share = 4.0 ** -(total - level)  # pixels at this level / output pixels
        macs += m.in_channels * m.out_channels * math.prod(m.kernel_size) / m.groups * share
    return DecoderProfile(max(full), macs)


def _first_int(config: dict, *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
