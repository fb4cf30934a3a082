"""How a VAE class is cut for a parallel decode: the data a family file declares for its VAE classes (``VAE_CUTS``),
found by class like DiT plans (``lightning_dit_parallel/registry.py``).

A ``VaeCut`` holds every fact about one VAE class that the banded decode (``parallel/vae/``) needs: the decoder
submodule whose forward is banded, the height dim, its attention modules (softmax over all bands, optionally
frame-causal masks; linear attention whose sums run over all bands), the convolutions that pad in their own forward,
the decoder's tensor arguments that are not cut (a timestep) and the modules that draw noise maps. Everything else is
found by type: every ``nn.Conv*`` of the decoder exchanges halo rows, every ``F.group_norm`` reduces its statistics
over the bands, every ``F.interpolate`` must be a nearest upsampling by an integer factor (a power of two when given
as a size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal


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
