"""How a VAE class is cut for a parallel decode (data, found by class like DiT plans).

A ``VaeCut`` holds every fact about one VAE class that the banded decode needs: the decoder submodule whose forward is
banded, the height dim, its attention modules (softmax over all bands, optionally frame-causal masks; linear attention
whose sums run over all bands), the convolutions that pad in their own forward, the decoder's tensor arguments that are
not cut (a timestep) and the modules that draw noise maps. Everything else is found by type: every ``nn.Conv*`` of the
decoder exchanges halo rows, every ``F.group_norm`` reduces its statistics over the bands, every ``F.interpolate``
must be a nearest upsampling by an integer factor (a power of two when given as a size). ``BUILTIN_CUTS`` is the one
table of diffusers classes, one self-contained entry per class; another VAE class gets one with ``register_vae_cut``
or a ``vae_cut`` class attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from torch import nn

from lightning_dit_parallel.plan import is_within


@dataclass(frozen=True)
class VaeCut:
    """How one VAE class is cut into bands along the height for a parallel decode.

    Args:
        decoder: path of the submodule whose forward is banded: its first argument (the latent) is cut into bands
            on entry and its output (a tensor, or a tuple whose first element is the decoded tensor) gathered on
            exit. Its other arguments that are not tensors are caches it fills itself (Wan's ``feat_cache`` list,
            CogVideoX's and Mochi's ``conv_cache`` dict, returned after the decoded tensor): they hold this band's
            rows and stay with the band. Other tensor arguments must be declared in ``replicated``.
        height_dim: the dim of the height in the decoder's input and in every activation inside it (negative: the
            same for 4-D images and 5-D videos).
        attention: class names of the decoder's attention modules; while one runs, its
            ``F.scaled_dot_product_attention`` attends over the keys and values of all bands. Any other call of
            ``F.scaled_dot_product_attention`` inside the decoder is an error (it would attend within one band).
        padding_attributes: class name -> attribute holding the padding, in ``F.pad`` order, of convolutions that pad
            in their own forward (diffusers' causal 3-D convolutions: ``(w, w, h, h, 2t, 0)``), instead of
            ``nn.Conv*``'s ``padding``. The class is either an ``nn.Conv*`` subclass (Wan) or a wrapper around one
            ``nn.Conv*`` child that pads the wrapper's input with ``F.pad`` (any mode but circular) before it
            (HunyuanVideo, Mochi); a wrapper whose child pads the height itself is banded at the child (CogVideoX).
        attention_masks: ``"none"``: the declared attention modules are called without a mask; ``"frame_causal"``:
            with a block-causal mask over frames (tokens ordered frame, row, column: a query attends to the keys of
            its own and earlier frames; HunyuanVideo), checked against that form on every call.
        linear_attention: class names of Sana-style multi-scale linear attention modules (an
            ``apply_linear_attention(query, key, value)`` whose value-key products are summed over all tokens): the
            sums run over all bands; their quadratic branch (images of at most ``attention_head_dim`` tokens) is
            refused.
        replicated: names of the decoder's tensor arguments that every band receives whole (they have no height,
            e.g. LTX-Video's ``temb``); any other tensor argument besides the latent is refused.
        noise: class names of modules that draw noise maps ``torch.randn((..., height, width))`` in their forward (LTX
            0.9.1's ``inject_noise``): every band draws the whole map, as one process does, and keeps its rows.
    """

    decoder: str = "decoder"
    height_dim: int = -2
    attention: tuple[str, ...] = ()
    padding_attributes: Mapping[str, str] = field(default_factory=dict)
    attention_masks: Literal["none", "frame_causal"] = "none"
    linear_attention: tuple[str, ...] = ()
    replicated: tuple[str, ...] = ()
    noise: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.height_dim >= 0:
            raise ValueError(f"VaeCut.height_dim must count from the end (negative); got {self.height_dim}.")
        if self.attention_masks not in ("none", "frame_causal"):
            raise ValueError(f"VaeCut.attention_masks must be 'none' or 'frame_causal'; got {self.attention_masks!r}.")
        for name in ("attention", "linear_attention", "replicated", "noise"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "padding_attributes", MappingProxyType(dict(self.padding_attributes)))


_IMAGE = VaeCut(attention=("Attention",))

#: diffusers class name -> its cut: every fact about that VAE class that the banded decode needs, in one entry.
BUILTIN_CUTS: Mapping[str, VaeCut] = MappingProxyType(
    {
        "AutoencoderKL": _IMAGE,
        "AutoencoderKLFlux2": _IMAGE,
        "AutoencoderKLWan": VaeCut(
            attention=("WanAttentionBlock",), padding_attributes={"WanCausalConv3d": "_padding"}
        ),
        "AutoencoderKLQwenImage": VaeCut(
            attention=("QwenImageAttentionBlock",), padding_attributes={"QwenImageCausalConv3d": "_padding"}
        ),
        # decoded a few latent frames at a time, its causal convolutions' cached frames kept per band; the spatial
        # norms' condition is the decoder's own input (the band), upsampled to each layer by a nearest interpolation to
        # a size; the causal convolutions pad the height in their nn.Conv3d child (pad_mode="first"), or with F.pad
        # replicate
        "AutoencoderKLCogVideoX": VaeCut(padding_attributes={"CogVideoXCausalConv3d": "time_causal_padding"}),
        # per-position RMS and layer norms, depth-to-space upsampling; the timestep is not cut; noise maps drawn whole
        "AutoencoderKLLTXVideo": VaeCut(replicated=("temb",), noise=("LTXVideoResnetBlock3d",)),
        # causal convolutions padded by F.pad replicate around an unpadded nn.Conv3d; frame-causal mid-block attention
        "AutoencoderKLHunyuanVideo": VaeCut(
            attention=("Attention",),
            attention_masks="frame_causal",
            padding_attributes={"HunyuanVideoCausalConv3d": "time_causal_padding"},
        ),
        # CogVideoX's causal convolutions in replicate mode; per-frame group norms; the decoder has no attention
        "AutoencoderKLMochi": VaeCut(padding_attributes={"CogVideoXCausalConv3d": "time_causal_padding"}),
        # Sana's DC-AE: per-position RMS norms, pixel-shuffle upsampling, multi-scale linear attention
        "AutoencoderDC": VaeCut(linear_attention=("SanaMultiscaleLinearAttention",)),
    }
)

_REGISTRY: dict[type, VaeCut] = {}


def register_vae_cut(cls: type[nn.Module], cut: VaeCut) -> None:
    """Declare how a VAE class (and its subclasses, unless they have their own) is cut for a parallel decode."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_vae_cut expects an nn.Module subclass, got {cls!r}.")
    if not isinstance(cut, VaeCut):
        raise TypeError(f"register_vae_cut expects a VaeCut, got {type(cut).__name__}.")
    _REGISTRY[cls] = cut


def unregister_vae_cut(cls: type[nn.Module]) -> None:
    """Remove a cut declared with ``register_vae_cut`` (no-op if none)."""
    _REGISTRY.pop(cls, None)


def vae_cut_for(module: nn.Module | type) -> VaeCut | None:
    """The cut of a VAE module or class: registered cuts, a ``vae_cut`` class attribute, then the shipped cuts of
    diffusers classes (by class name); ``None`` when there is none."""
    cls = module if isinstance(module, type) else type(module)
    for klass in cls.__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
        attr = klass.__dict__.get("vae_cut")
        if isinstance(attr, VaeCut):
            return attr
        if klass.__module__.startswith("diffusers.") and klass.__name__ in BUILTIN_CUTS:
            return BUILTIN_CUTS[klass.__name__]
    return None


def is_diffusers_vae(module: nn.Module) -> bool:
    """Whether ``module`` is one of diffusers' autoencoders: a class of ``diffusers.models.autoencoders`` with a
    ``decode`` method (not one of their layers)."""
    return type(module).__module__.startswith("diffusers.models.autoencoders.") and callable(
        getattr(type(module), "decode", None)
    )


def find_vaes(root: nn.Module) -> list[tuple[str, nn.Module, VaeCut]]:
    """Every outermost submodule of ``root`` (``root`` included) whose class has a cut.

    Raises:
        ValueError: for a diffusers autoencoder without a cut (the message names the classes that have one), or
            when there is no VAE with a cut at all (``parallel_vae=True`` would change nothing).
    """
    found: list[tuple[str, nn.Module, VaeCut]] = []
    for path, module in root.named_modules():
        if any(is_within(path, p) for p, _, _ in found):
            continue
        cut = vae_cut_for(module)
        if cut is not None:
            found.append((path, module, cut))
        elif is_diffusers_vae(module) and not any(is_within(path, p) for p, _, _ in found):
            raise ValueError(
                f"parallel_vae=True: {type(module).__name__} ({path or 'the module'}) has no parallel decode; VAE"
                f" classes with one: {sorted(BUILTIN_CUTS)}. Declare one with"
                " `lightning_dit_parallel.parallel.vae.register_vae_cut(cls, VaeCut(...))`, or use parallel_vae=False."
            )
    if not found:
        classes = sorted({type(m).__name__ for _, m in root.named_children()}) or [type(root).__name__]
        raise ValueError(
            f"parallel_vae=True, but no submodule of {type(root).__name__} is a VAE with a parallel decode (children:"
            f" {classes}; VAE classes with one: {sorted(BUILTIN_CUTS)})."
        )
    return found
