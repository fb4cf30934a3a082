"""Route one attention module's attention calls to another kernel while its forward runs, in this thread only.

A diffusers attention module reaches its attention kernel in one of two ways, and both are routed:

* through diffusers' attention dispatcher (``dispatch_attention_fn(..., backend=processor._attention_backend,
  parallel_config=processor._parallel_config)``; the processors of Flux, Wan, QwenImage, ... do this and honour
  ``model.set_attention_backend(...)``). For the duration of the module's forward its processor's backend is set to
  ``_router`` (one backend registered in diffusers' registry on first use, stateless) and its ``_parallel_config`` to
  this module's ``RouteContext``: the dispatcher hands the context to ``_router``, which calls the context's kernel
  with the backend the user had chosen. Both attributes are put back after the forward (also when it raises), so
  ``set_attention_backend`` and diffusers' own checks see the model as the user left it.
* by calling ``F.scaled_dot_product_attention`` directly (``AttnProcessor2_0`` and most hand-written DiTs): a
  ``TorchFunctionMode`` is pushed for the module's forward. Torch function modes are thread-local, so another thread
  running another model (or the same code unparallelized) is not affected, and nothing is replaced at module level.

The kernel has SDPA's signature and (B, H, S, D) layout plus ``backend``: the diffusers backend name the user set
(``None`` on the SDPA route). Under ``torch.compile`` the two hooks run eagerly (a graph break at each end of the
module), so that what they set and put back on the processor really happens on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

#: kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend) -> (B, H, Sq, D)
RoutedKernel = Callable[..., Tensor]

#: The name ``_router`` is registered under in diffusers' attention backend registry.
ROUTER_NAME = "lightning_dit_parallel"

_router_member = None

#: The processor attributes a routed forward sets (diffusers' dispatcher reads them) and puts back.
_ROUTED = ("_attention_backend", "_parallel_config")


@dataclass
class RouteContext:
    """What one routed attention module's dispatcher calls need, passed as diffusers' ``parallel_config``."""

    kernel: RoutedKernel
    backend: Any  # the AttentionBackendName the user chose (the processor's, else diffusers' active one)
    where: str
    restore: dict[str, Any]  # the processor's own routed attributes before the forward


def router_backend():
    """The ``AttentionBackendName`` member under which ``_router`` is registered (registered on first call).

    diffusers' enum has no member for a backend of ours, so this is a member object outside the enum's value table:
    ``AttentionBackendName("lightning_dit_parallel")`` still raises and ``set_attention_backend`` refuses it (users
    never pick it), while ``dispatch_attention_fn(backend=member)`` finds it in the registry. Registering adds an
    entry and replaces nothing.
    """
    global _router_member
    if _router_member is None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        member = str.__new__(AttentionBackendName, ROUTER_NAME)
        member._name_, member._value_ = ROUTER_NAME.upper(), ROUTER_NAME
        _AttentionBackendRegistry.register(member)(_router)
        _router_member = member
    return _router_member


def _router(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: RouteContext | None = None,
) -> Tensor:
    """The registered backend: (B, S, H, D) in and out (diffusers' layout), the context's kernel in between."""
    context = _parallel_config
    if not isinstance(context, RouteContext):
        raise RuntimeError(
            f"The {ROUTER_NAME!r} attention backend runs only inside an attention module that lightning_dit_parallel"
            " routes (it was called without its context)."
        )
    if return_lse:
        raise NotImplementedError(f"{context.where}: a processor that asks for return_lse cannot be routed.")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # 3 x (B, S, H, D) -> (B, H, S, D)
    out = context.kernel(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=context.backend)
    return out.transpose(1, 2)  # (B, H, S, D) -> (B, S, H, D)


class _SDPAInterceptor(TorchFunctionMode):
    """Sends this thread's ``F.scaled_dot_product_attention`` calls to ``kernel`` (every other call passes through)."""

    def __init__(self, kernel: RoutedKernel) -> None:
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _call_with_sdpa_arguments(self.kernel, args, kwargs)
        return func(*args, **kwargs)


def _call_with_sdpa_arguments(kernel: RoutedKernel, args: tuple, kwargs: dict) -> Tensor:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    bound = dict(zip(names, defaults))
    bound.update(zip(names, args))
    bound.update(kwargs)
    return kernel(*(bound[n] for n in names), backend=None)


def _member(backend: Any) -> Any:
    """The ``AttentionBackendName`` member of a backend given as a member or a name, looked up by value: a new
    reference, not the processor's attribute (under torch.compile a reference read from the attribute could follow
    the attribute when the route then sets it)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName._value2member_map_[str(getattr(backend, "value", backend))]


def uses_dispatcher(module: nn.Module) -> bool:
    """Whether ``module`` attends through diffusers' dispatcher (its processor carries ``_attention_backend``)."""
    return hasattr(getattr(module, "processor", None), "_attention_backend")


def route_attention_during_forward(module: nn.Module, kernel: RoutedKernel, where: str) -> list[RemovableHandle]:
    """Hooks that route ``module``'s attention to ``kernel`` for the duration of each of its forwards.

    The route is chosen per forward (the processor may be replaced after the hooks are installed): diffusers'
    dispatcher when the processor uses it, else ``F.scaled_dot_product_attention``. Returns the hook handles; removing
    them also puts the processor's attributes back should a forward have left them routed.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    modes: list[_SDPAInterceptor] = []
    router = router_backend()  # registered here, outside any compiled region
    processors: list[Any] = []  # every processor routed, to put back on removal

    def enter(module: nn.Module, args: tuple) -> None:
        if uses_dispatcher(module):
            processor = module.processor
            config = getattr(processor, "_parallel_config", None)
            if isinstance(config, RouteContext):  # still routed (a compiled forward may not replay the restore)
                chosen, own = config.backend, config.restore
            else:
                chosen = _member(processor._attention_backend or _AttentionBackendRegistry._active_backend)
                own = {name: processor.__dict__[name] for name in _ROUTED if name in processor.__dict__}  # not defaults
            if not any(p is processor for p in processors):
                processors.append(processor)
            processor._attention_backend = router
            processor._parallel_config = RouteContext(kernel, chosen, where, own)
        else:
            mode = _SDPAInterceptor(kernel)
            mode.__enter__()
            modes.append(mode)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        processor = getattr(module, "processor", None)
        config = getattr(processor, "_parallel_config", None)
        if isinstance(config, RouteContext):
            _restore(processor, config.restore)
        elif modes:  # empty when an earlier pre-hook raised before ``enter`` ran
            modes.pop().__exit__(None, None, None)

    def restore_all() -> None:
        for processor in processors:
            config = getattr(processor, "_parallel_config", None)
            if isinstance(config, RouteContext):
                _restore(processor, config.restore)
        processors.clear()

    # Run eagerly under torch.compile (a graph break at each end of the module): their effects on the processor are
    # then real, and the traced code in between reads the routed attributes (dynamo does not always replay a restore
    # traced after a higher-order op such as flex_attention).
    enter, leave = torch.compiler.disable(enter), torch.compiler.disable(leave)
    return [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
        _OnRemove(restore_all),
    ]


def _restore(processor: Any, own: dict[str, Any]) -> None:
    """The processor's routed attributes exactly as before: one the instance did not have is deleted (compiled code
    guards on the instance's ``__dict__``; an added attribute would make it recompile)."""
    for name in _ROUTED:
        if name in own:
            setattr(processor, name, own[name])
        elif name in processor.__dict__:
            delattr(processor, name)


class _OnRemove:
    """A handle whose ``remove()`` runs a function (once)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def remove(self) -> None:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            fn()
