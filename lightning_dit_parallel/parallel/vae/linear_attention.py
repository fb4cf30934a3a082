"""Linear attention over bands (Sana's DC-AE): the value-key products summed over every band's tokens.

``SanaMultiscaleLinearAttention.apply_linear_attention(q, k, v)`` computes, per head, ``[v; 1] k^T`` (a
``(d + 1, d)`` sum over all tokens), multiplies it by every token's query and divides by the last row. The sum over
tokens is the only place where tokens meet: each band computes its own tokens' part, one all-reduce adds the bands'
parts, and every band finishes its own tokens with the whole image's sums, exactly what one process computes (up to
the order of the float additions).

The attention's processor chooses the quadratic branch for images of at most ``attention_head_dim`` tokens, from the
band's own size; a pre-hook checks on every rank, from the rows all ranks know alike, that every band takes the linear
branch (else the same ``ValueError`` everywhere, before any collective), and the quadratic branch is refused.

Traffic: one all-reduce of ``(B, heads, d + 1, d)`` per call (float32), independent of the image's size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.vae.bands import BandGroup, Bands


class BandLinearAttention:
    """The banded ``apply_linear_attention`` of one module, installed as an instance attribute; ``remove()`` takes
    it off (the class's method shows through again).

    Args:
        module: the attention module (``attention_head_dim``, ``eps``, ``apply_linear_attention``).
        where: its path, for messages.
        band: the ranks holding the other bands.
        bands: the cut of the decoder call in progress, or ``None`` outside one (then the module runs as it is).
        height_dim: the height's tensor dim in the module's input.
    """

    def __init__(
        self, module: nn.Module, where: str, band: BandGroup, bands: Callable[[], Bands | None], height_dim: int
    ) -> None:
        for name in ("attention_head_dim", "eps", "apply_linear_attention", "apply_quadratic_attention"):
            if not hasattr(module, name):
                raise ValueError(f"{where} ({type(module).__name__}) has no {name}: not a Sana linear attention.")
        self.module, self.where, self.band, self.bands, self.height_dim = module, where, band, bands, height_dim
        self._linear = type(module).apply_linear_attention
        module.apply_linear_attention = self.apply_linear_attention
        module.apply_quadratic_attention = self.apply_quadratic_attention
        self.handle: RemovableHandle = module.register_forward_pre_hook(self.check)

    def remove(self) -> None:
        self.handle.remove()
        for name in ("apply_linear_attention", "apply_quadratic_attention"):
            self.module.__dict__.pop(name, None)

    def check(self, module: nn.Module, args: tuple) -> None:
        """Every band takes the linear branch (its tokens outnumber ``attention_head_dim``); the same on all ranks."""
        cut = self.bands()
        if cut is None:
            return
        x = args[0]  # (B, C, h, W)
        rows = cut.rows_at(x.shape[self.height_dim], self.where)
        width = x.numel() // max(x.shape[0] * x.shape[1] * x.shape[self.height_dim], 1)
        if min(rows) * width <= module.attention_head_dim:
            raise ValueError(
                f"{self.where}: bands of {list(rows)} rows x {width} columns; the banded linear attention needs more"
                f" than attention_head_dim={module.attention_head_dim} tokens in every band (its processor would"
                " take the quadratic branch). Decode taller latents or use fewer ranks."
            )

    def apply_linear_attention(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """diffusers' ``apply_linear_attention`` with the sums over tokens taken over all bands.

        query, key, value: (B, heads, d, S_band) -> (B, heads, d, S_band).
        """
        if self.bands() is None:
            return self._linear(self.module, query, key, value)
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1)  # (B, h, d + 1, S_band): a row of ones
        scores = torch.matmul(value, key.transpose(-1, -2))  # (B, h, d + 1, d): this band's tokens' sum
        dist.all_reduce(scores, group=self.band.group)  # (B, h, d + 1, d): the sum over every band's tokens
        hidden_states = torch.matmul(scores, query)  # (B, h, d + 1, S_band)
        hidden_states = hidden_states.to(dtype=torch.float32)
        return hidden_states[:, :, :-1] / (hidden_states[:, :, -1:] + self.module.eps)

    def apply_quadratic_attention(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        if self.bands() is None:
            return type(self.module).apply_quadratic_attention(self.module, query, key, value)
        raise ValueError(f"{self.where}: the quadratic branch of the linear attention ran inside a banded decode.")
