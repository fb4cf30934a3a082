"""``WeightGate``: a skipped block does not bring its weights in.

A skipped block is still called (so that every other parallelizer's hooks run the same in both branches), but its
weights are not needed: FSDP's all-gather and offload's host-to-device copy of a skipped block would be traffic for
nothing. The parallelizers list the hooks that only bring a module's weights in and out (``utils.hooks.WeightHooks``:
FSDP2's pre- and post-forward hooks of a unit, offload's load and unload hooks); the gate takes them out of the
block's hook order and runs them from the step cache's own pre-hook, the block's last, once the step's branch is known
(teacache decides inside the first block, which therefore always brings its weights in), and only when the block
computes; the post-forward halves run only after their pre-forward halves ran.

Why this keeps the collectives matched: the skip decision is reduced over every rank of the FSDP group (the decision
group includes the FSDP shard axes, ``cache.apply``), so all of them bypass the same blocks' all-gathers. FSDP2 keeps
no per-unit state across units in inference (no prefetch is configured; the root's lazy init and forward bookkeeping
are in the root's hooks, which are never gated); a unit whose hooks did not run stays sharded and idle, as between two
forwards. FSDP units inside a block (the plan's shared modules, ``fsdp_units="layers"``) gather in their own
forward, which a skipped block does not call. Moving the pre-hooks to the end of the block's pre-hooks changes
nothing else: they read no arguments but the device (offload) and return them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_dit_parallel.utils.hooks import WeightHooks
from lightning_dit_parallel.utils.hooks import inert_hook as _inert  # the gate runs the gated hook itself


class WeightGate:
    """The weight hooks of one block, run by the step cache only when the block computes.

    Args:
        module: the block.
        hooks: its weight hooks (``WeightHooks``), from every parallelizer that installed some.
    """

    def __init__(self, module: nn.Module, hooks: list[WeightHooks]) -> None:
        self.module = module
        self._pre: dict[int, Callable] = {}  # hook id -> the parallelizer's pre-hook
        self._post: dict[int, Callable] = {}  # hook id -> the parallelizer's post-hook
        self._installed: list[tuple[dict, int, Callable]] = []  # (hook dict, id, our entry) to undo
        self.loaded = False  # whether this call ran the pre-hooks (then the post-hooks run too)
        for pair in hooks:
            pre_dict, post_dict = pair.pre.hooks_dict_ref(), pair.post.hooks_dict_ref()
            if pre_dict is None or post_dict is None or pair.pre.id not in pre_dict or pair.post.id not in post_dict:
                continue  # removed meanwhile: nothing to gate
            self._pre[pair.pre.id] = pre_dict[pair.pre.id]
            self._post[pair.post.id] = post_dict[pair.post.id]

    def install(self) -> WeightGate:
        pre_dict, post_dict = self.module._forward_pre_hooks, self.module._forward_hooks
        for key in self._pre:
            pre_dict[key] = _inert
            self._installed.append((pre_dict, key, _inert))
        for key, hook in self._post.items():
            gated = self._gated_post(hook)
            post_dict[key] = gated
            self._installed.append((post_dict, key, gated))
        return self

    def remove(self) -> None:
        """Put the parallelizers' hooks back in their places (where ours are still there)."""
        originals = {**self._pre, **self._post}
        for hooks, key, ours in self._installed:
            if hooks.get(key) is ours:
                hooks[key] = originals[key]
        self._installed.clear()
        self.loaded = False

    def __bool__(self) -> bool:
        return bool(self._pre)

    def begin(self, compute: bool, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """At the block's last pre-hook: with ``compute``, run the gated pre-hooks in their hook order (as
        ``nn.Module.__call__`` would: with or without kwargs, their results replacing the arguments); else none."""
        self.loaded = compute
        if not compute:
            return args, kwargs
        with_kwargs = self.module._forward_pre_hooks_with_kwargs
        for key in [k for k in self.module._forward_pre_hooks if k in self._pre]:  # the block's hook order
            hook = self._pre[key]
            if key in with_kwargs:
                result = hook(self.module, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(self.module, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        return args, kwargs

    def _gated_post(self, hook: Callable) -> Callable:
        def post(*args, **kwargs):
            if self.loaded:
                return hook(*args, **kwargs)
            return None

        return post
