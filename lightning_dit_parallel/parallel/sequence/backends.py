"""The local attention of sequence parallelism on the diffusers attention backend the user chose.

``model.set_attention_backend("flash" | "_flash_3" | "sage" | "flex" | "_native_cudnn" | ...)`` picks a kernel in
diffusers' dispatcher. Under sequence parallelism the attention of each rank's part runs on that backend:

* Ulysses: the attention over the whole sequence of this rank's heads is one call of the backend.
* Ring (and the ring part of USP): the partial results over key blocks are merged through their log-sum-exp, so the
  kernel must return it. In order: diffusers' torch-native backends get the matching torch op that returns it
  (``native``: torch's fused SDPA ops, ``_native_math``: the math path, ``flex``: ``flex_attention(return_lse=True)``,
  ``_native_cudnn`` / ``_native_flash``: diffusers' own context-parallel forward ops); any other backend is called
  with diffusers' ``return_lse=True``. A backend that has no log-sum-exp (no ``return_lse`` argument, or it raises
  ``ValueError`` / ``NotImplementedError`` for it) is replaced by torch's SDPA kernel with a one-time warning, or
  refused when ``lse_fallback="error"``.
* A mask (the sharding's padding when token counts do not divide the degree, or the model's own key mask): a backend
  that rejects masks (flash-attn, sage: ``ValueError``) is replaced by torch's SDPA kernel for masked calls, with a
  one-time warning.

Before the first collective of each call, ``check_backend`` runs diffusers' requirement and constraint checks of the
backend on the local tensors (installed package, device, dtype, head dim): they depend only on what every rank of
the group holds alike, so a backend that cannot run is refused with the same error on every rank, none left waiting.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dit_parallel.parallel.sequence.local_attention import attention_with_lse, attention_with_lse_math
from lightning_dit_parallel.parallel.sequence.masks import mask_to_bias

log = logging.getLogger(__name__)

#: attend(q, k, v, attn_mask, scale) -> (B, H, Sq, D); q, k, v (B, H, S, D); attn_mask (Bm, 1, 1 or Sq, Sk) or None.
Attend = Callable[..., Tensor]
#: attend_with_lse(q, k, v, key_valid, scale) -> (out (B, H, Sq, D), lse (B, H, Sq) float32), as ``attention_with_lse``.
AttendWithLSE = Callable[..., "tuple[Tensor, Tensor]"]

LSEFallback = Literal["warn", "error"]

#: Backends whose ``return_lse`` gives (B, H, S) (flash-attn's and sage's own layout); others give diffusers' model
#: layout (B, S, H). Only consulted when the two cannot be told apart by shape (as many heads as queries).
_LSE_HEADS_FIRST = {
    "flash",
    "flash_hub",
    "_flash_3",
    "_flash_3_hub",
    "flash_4_hub",
    "sage",
    "sage_hub",
    "aiter_fa2_hub",
}

_warned: set[str] = set()


def _missing() -> None:
    """Stands for a backend missing from the registry."""


def _warn_once(key: str, message: str) -> None:
    """Log ``message`` the first time ``key`` comes up in this process (one warning per backend and reason)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def backend_name(backend: Any) -> str | None:
    """The plain name of a diffusers backend (``AttentionBackendName`` or str); ``None`` for torch's SDPA."""
    if backend is None:
        return None
    return getattr(backend, "value", backend)


def check_backend(backend: Any, q: Tensor, k: Tensor, v: Tensor, where: str) -> None:
    """Refuse, before any collective, a backend that cannot run here: diffusers' requirement checks (the package is
    installed) and the backend's registered constraints (device, dtype, head dim) on this rank's (B, H, S, D) part.

    Raises:
        ValueError: naming the module, the backend and diffusers' reason (the same on every rank of the group).
    """
    name = backend_name(backend)
    if name is None or name in ("native", "_native_math"):
        return
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        _check_attention_backend_requirements,
    )

    member = backend if isinstance(backend, AttentionBackendName) else AttentionBackendName(name)
    try:
        if not torch.compiler.is_compiling():  # a package check (cached by nothing: cheap); skipped when tracing
            _check_attention_backend_requirements(member)
        q4, k4, v4 = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) -> (B, S, H, D): diffusers' layout
        for check in _AttentionBackendRegistry._constraints.get(member, []):
            check(query=q4, key=k4, value=v4, attn_mask=None, is_causal=False)
    except (ValueError, RuntimeError, ImportError) as err:
        raise ValueError(
            f"{where}: the attention backend {name!r} set with set_attention_backend cannot run sequence-parallel"
            f" attention on {q.device.type} {q.dtype} with head dim {q.shape[-1]}: {err}"
        ) from err


def local_attend(backend: Any, where: str) -> Attend:
    """The local kernel of Ulysses: the backend itself (through diffusers' dispatcher), torch's SDPA for ``None``."""
    name = backend_name(backend)
    if name is None:
        return _sdpa
    return functools.partial(_dispatched, backend, name, where)


def local_attend_with_lse(backend: Any, where: str, fallback: LSEFallback = "warn") -> AttendWithLSE:
    """The block kernel of Ring: the backend's own attention with its log-sum-exp (see the module docstring)."""
    name = backend_name(backend)
    if name is None:
        return attention_with_lse
    from diffusers.models import attention_dispatch as dispatch

    member = backend if isinstance(backend, dispatch.AttentionBackendName) else dispatch.AttentionBackendName(name)
    registered = inspect.unwrap(dispatch._AttentionBackendRegistry._backends.get(member, _missing))  # through wrappers
    # diffusers' own torch-native backends (by function: a backend registered again under one of their names is not)
    native = {
        dispatch._native_attention: attention_with_lse,
        dispatch._native_math_attention: _math_with_lse,
        dispatch._native_flex_attention: _flex_with_lse,
        dispatch._native_cudnn_attention: functools.partial(_forward_op_with_lse, "_native_cudnn", where, fallback),
        dispatch._native_flash_attention: functools.partial(_forward_op_with_lse, "_native_flash", where, fallback),
    }
    if registered in native:
        return native[registered]
    if "return_lse" not in dispatch._AttentionBackendRegistry._supported_arg_names.get(member, ()):
        return _fallback_lse(name, where, fallback, "it has no return_lse argument")
    return functools.partial(_dispatched_with_lse, backend, name, where, fallback)


# -- kernels ------------------------------------------------------------------------------------------------------


def _sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _dispatched(
    backend: Any, name: str, where: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None
) -> Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    bias = None if attn_mask is None else mask_to_bias_4d(attn_mask, q.dtype)
    q4, k4, v4 = (x.transpose(1, 2) for x in (q, k, v))  # 3 x (B, H, S, D) -> (B, S, H, D)
    try:
        out = dispatch_attention_fn(q4, k4, v4, attn_mask=bias, scale=scale, backend=backend)
    except (ValueError, NotImplementedError) as err:
        if bias is None:
            raise
        _warn_once(
            f"{name}:mask",
            f"{where}: attention backend {name!r} refused a mask ({err}); masked calls use"
            " torch's SDPA kernel instead (this warning is shown once).",
        )
        return _sdpa(q, k, v, bias, scale)
    return out.transpose(1, 2)  # (B, S, H, D) -> (B, H, S, D)


def _dispatched_with_lse(
    backend: Any,
    name: str,
    where: str,
    fallback: LSEFallback,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    bias = None if key_valid is None else mask_to_bias(key_valid, q.dtype)  # -> (Bm, 1, 1 or Sq, Sk)
    q4, k4, v4 = (x.transpose(1, 2) for x in (q, k, v))  # 3 x (B, H, S, D) -> (B, S, H, D)
    try:
        result = dispatch_attention_fn(
            q4, k4, v4, attn_mask=bias, scale=scale, attention_kwargs={"return_lse": True}, backend=backend
        )
    except (ValueError, NotImplementedError) as err:
        reason = f"it refused {'a mask' if bias is not None else 'return_lse'} ({err})"
        return _fallback_lse(name, where, fallback, reason)(q, k, v, key_valid, scale)
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], Tensor)):
        reason = "return_lse=True did not return (out, lse)"
        return _fallback_lse(name, where, fallback, reason)(q, k, v, key_valid, scale)
    out, lse = result
    lse = _heads_first(lse, q.shape, name, where)
    return _empty_rows(out.transpose(1, 2), lse.float(), bias)  # out (B, S, H, D) -> (B, H, S, D)


def _fallback_lse(name: str, where: str, fallback: LSEFallback, reason: str) -> AttendWithLSE:
    message = (
        f"attention backend {name!r} gives no log-sum-exp for ring attention ({reason}); ring blocks use torch's"
        " SDPA kernel instead"
    )
    if fallback == "error":
        raise ValueError(
            f"{where}: {message} - refused because lse_fallback='error'. Use ulysses_degree only, or a"
            " backend with return_lse (e.g. 'flash', '_flash_3', 'flex', 'native')."
        )
    _warn_once(f"{name}:lse", f"{where}: {message} (this warning is shown once).")
    return attention_with_lse


def _heads_first(lse: Tensor, q_shape: torch.Size, name: str, where: str) -> Tensor:
    """A backend's lse as (B, H, Sq), from (B, H, Sq) or diffusers' model layout (B, Sq, H) (also with a trailing 1)."""
    b, h, s, _ = q_shape
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    if tuple(lse.shape) == (b, h, s) and (h != s or name in _LSE_HEADS_FIRST):
        return lse
    if tuple(lse.shape) == (b, s, h):
        return lse.transpose(1, 2)  # (B, S, H) -> (B, H, S)
    raise ValueError(
        f"{where}: attention backend {name!r} returned an lse of shape {tuple(lse.shape)} for queries"
        f" (B, H, S) = {(b, h, s)}; expected (B, H, S) or (B, S, H)."
    )


def _empty_rows(out: Tensor, lse: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Queries whose keys are all masked: out 0, lse -inf (kernels give 0, nan or garbage), so they merge as nothing."""
    if bias is None:
        return out, lse
    empty = ~(bias > float("-inf")).any(dim=-1)  # (Bm, 1, 1 or Sq): rows without a key
    return out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, float("-inf"))


def _math_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    bias = None if key_valid is None else mask_to_bias(key_valid, q.dtype)  # -> (Bm, 1, 1 or Sq, Sk)
    return attention_with_lse_math(q, k, v, bias, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def _flex_with_lse(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, scale: float | None
) -> tuple[Tensor, Tensor]:
    """``flex_attention`` with ``return_lse=True`` (diffusers 0.42's flex backend cannot return it: it permutes the
    tuple); a mask becomes an additive ``score_mod``."""
    from torch.nn.attention import flex_attention

    bias = None if key_valid is None else mask_to_bias(key_valid, q.dtype)  # -> (Bm, 1, 1 or Sq, Sk)
    score_mod = None if bias is None else _additive_score_mod(bias, q.shape[0], q.shape[2], k.shape[2])
    call = flex_attention.flex_attention
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        call = _flex_outside_graph  # inductor's CPU flex kernel has no return_lse (torch 2.13)
    out, lse = call(q, k, v, score_mod=score_mod, scale=scale, return_lse=True)
    return _empty_rows(out, lse.float(), bias)


@torch.compiler.disable
def _flex_outside_graph(*args, **kwargs):
    """``flex_attention`` run eagerly from compiled code (a graph break)."""
    from torch.nn.attention import flex_attention

    return flex_attention.flex_attention(*args, **kwargs)


def _additive_score_mod(bias: Tensor, batch: int, queries: int, keys: int) -> Callable:
    """A flex ``score_mod`` adding ``bias`` (Bm, 1, 1 or Sq, Sk) to the scores."""
    full = bias.expand(batch, 1, queries, keys)  # (B, 1, Sq, Sk)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + full[b, 0, q_idx, kv_idx]

    return score_mod


def _forward_op_with_lse(
    name: str,
    where: str,
    fallback: LSEFallback,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    """``_native_cudnn`` / ``_native_flash``: the forward op diffusers' own context parallelism uses (its public
    ``return_lse`` path needs a parallel config in diffusers 0.42)."""
    from diffusers.models import attention_dispatch as dispatch

    ops = {
        "_native_cudnn": dispatch._cudnn_attention_forward_op,
        "_native_flash": dispatch._native_flash_attention_forward_op,
    }
    op = ops[name]
    bias = None if key_valid is None else mask_to_bias(key_valid, q.dtype)  # -> (Bm, 1, 1 or Sq, Sk)
    if bias is not None and name == "_native_flash":
        return _fallback_lse(name, where, fallback, "it takes no mask")(q, k, v, key_valid, scale)
    q4, k4, v4 = (x.transpose(1, 2) for x in (q, k, v))  # 3 x (B, H, S, D) -> (B, S, H, D)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # cuDNN wants the full (B, H, Sq, Sk)
    out, lse = op(None, q4, k4, v4, bias, 0.0, False, scale, False, True, _save_ctx=False)
    lse = _heads_first(lse, q.shape, name, where)
    return _empty_rows(out.transpose(1, 2), lse.float(), bias)  # out (B, S, H, D) -> (B, H, S, D)


def mask_to_bias_4d(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A 4-D bool or additive mask (Bm, 1, 1 or Sq, Sk) as an additive bias of ``dtype`` (what every backend takes)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)
