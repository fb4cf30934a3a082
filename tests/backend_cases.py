"""Shared pieces of the attention-backend tests: attention backends registered in diffusers' registry by the test
(standing in for GPU kernels), call counters on every backend, and the sequence-parallel groups of a layout."""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist

from lightning_dit_parallel.parallel.sequence.groups import SequenceGroups

#: Test backends, each registered over a diffusers name whose own kernel cannot run on CPU float32 and that has no
#: package requirement: "with lse" stands in for flash-attn / FA3 (``return_lse``, masks), "without" for a kernel with
#: neither (it raises ``ValueError`` for a mask, as flash-attn and sage do).
WITH_LSE = "_native_efficient"
WITHOUT_LSE = "_native_cudnn"

#: The backends every layout is tested with: diffusers' own CPU backends and the two registered by the test.
BACKENDS = ("native", "_native_math", "flex", WITH_LSE, WITHOUT_LSE)


def _math_attention(query, key, value, attn_mask, scale):
    """(B, S, H, D) math attention in float64 statistics; returns out (B, S, H, D), lse (B, S, H)."""
    q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))  # -> (B, H, S, D)
    scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (B, H, Sq, Sk)
    if attn_mask is not None:
        scores = (
            scores + attn_mask.double() if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, -math.inf)
        )
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    out = torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ v  # (B, H, Sq, D)
    return out.transpose(1, 2).to(query.dtype), lse.transpose(1, 2).float()  # (B, S, H, D), (B, S, H)


def register_test_backends(calls: Counter) -> Callable[[], None]:
    """Register the two test backends, and wrap every registered backend to count its calls in ``calls`` (keys:
    backend name, and ``"<name>+lse"`` for calls with ``return_lse=True``). Returns a function that restores the
    registry."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    saved = (dict(registry._backends), dict(registry._constraints), dict(registry._supported_arg_names))
    active = registry._active_backend  # diffusers' set_attention_backend also sets this process-wide default

    def with_lse(query, key, value, attn_mask=None, scale=None, return_lse=False, _parallel_config=None):
        out, lse = _math_attention(query, key, value, attn_mask, scale)
        return (out, lse) if return_lse else out

    def without_lse(query, key, value, attn_mask=None, scale=None, _parallel_config=None):
        if attn_mask is not None:  # like flash-attn and sage
            raise ValueError("`attn_mask` is not supported by this test kernel.")
        return _math_attention(query, key, value, attn_mask, scale)[0]

    registry.register(AttentionBackendName(WITH_LSE))(with_lse)
    registry.register(AttentionBackendName(WITHOUT_LSE))(without_lse)
    for member, fn in list(registry._backends.items()):

        @functools.wraps(fn)
        def counting(*args, _fn=fn, _name=getattr(member, "value", member), **kwargs):
            calls[_name + ("+lse" if kwargs.get("return_lse") else "")] += 1
            return _fn(*args, **kwargs)

        registry._backends[member] = counting

    from torch.nn.attention import flex_attention

    flex = flex_attention.flex_attention

    def counting_flex(*args, **kwargs):
        calls["flex_attention" + ("+lse" if kwargs.get("return_lse") else "")] += 1
        return flex(*args, **kwargs)

    flex_attention.flex_attention = counting_flex

    def restore() -> None:
        registry._backends, registry._constraints, registry._supported_arg_names = (dict(d) for d in saved)
        registry._active_backend = active
        flex_attention.flex_attention = flex

    return restore


def layout_groups(rank: int, world: int, ulysses: int) -> SequenceGroups:
    """Groups of a ring x ulysses grid over all ranks (every rank creates every group, as ``new_group`` requires)."""
    ring = world // ulysses
    uly = [dist.new_group([r * ulysses + u for u in range(ulysses)]) for r in range(ring)]
    rings = [dist.new_group([r * ulysses + u for r in range(ring)]) for u in range(ulysses)]
    return SequenceGroups(
        ulysses=uly[rank // ulysses] if ulysses > 1 else None, ring=rings[rank % ulysses] if ring > 1 else None
    )


class Captured(logging.Handler):
    """Collects the messages of one logger (the one-time fallback warnings)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.messages: list[str] = []
        logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
