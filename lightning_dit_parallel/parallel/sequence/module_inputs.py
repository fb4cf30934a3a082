"""Cuts and gathers of submodule arguments at every call of every module a plan pattern matches.

``split_module_inputs`` cuts a sequence once per forward, where it first appears as one tensor. Two things need a
hook at every call instead:

* ``split_module_inputs_each_call``: a per-token tensor the DiT's forward keeps whole and passes to every block
  (e.g. Cosmos' per-frame timestep embedding expanded over the tokens); each call gets this rank's shard of it.
* ``gather_module_inputs``: a cut sequence that a module needs whole, e.g. the keys and values of LTX-2's attention
  from video to audio tokens, both cut: the audio shards are all-gathered before the module runs, which then attends
  as cross-attention with the local kernel. Every rank runs the same modules in the same order, so every rank
  reaches every gather.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.sequence.sharding import ShardingState
from lightning_dit_parallel.plan import DiTPlan, SplitSpec, module_paths
from lightning_dit_parallel.plan.splits import cut_arguments

#: require_state(where) -> the sharding state of the forward in progress (raises outside one).
StateFn = Callable[[str], ShardingState]


@dataclass(frozen=True)
class ModuleInputHook:
    """One matched module: cut (``"split"``) or gather (``"gather"``) the named arguments at every call."""

    kind: Literal["split", "gather"]
    pattern: str
    path: str
    module: nn.Module
    specs: Mapping[str, SplitSpec]


def module_input_hooks(plan: DiTPlan, model: nn.Module) -> list[ModuleInputHook]:
    """The modules matched by ``split_module_inputs_each_call`` and ``gather_module_inputs``, checked.

    Pure computation: every rank reaches the same verdict before any communication.

    Raises:
        ValueError: for a pattern that matches no module, or a matched module whose forward lacks a named argument
            (and takes no ``*args``).
    """
    hooks = []
    modules = dict(model.named_modules())
    for kind, field in (("split", "split_module_inputs_each_call"), ("gather", "gather_module_inputs")):
        for pattern, specs in getattr(plan, field).items():
            matched = [(p, modules[p]) for p in module_paths(modules, pattern)]  # outermost matches
            if not matched and not holds_released_blocks(modules):  # a pipeline stage may hold none of its blocks
                raise ValueError(f"Plan {field}[{pattern!r}] matches no module of {type(model).__name__}.")
            for path, module in matched:
                parameters = inspect.signature(module.forward).parameters
                unknown = [n for n in specs if n not in parameters]
                # A forward that takes *args without naming an argument is a variant of the block that ignores it
                # (e.g. HunyuanVideo's blocks without first-frame modulation): the argument is left alone there.
                if unknown and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values()):
                    raise ValueError(
                        f"Plan {field}[{pattern!r}] {unknown} are not arguments of {type(module).__name__}.forward"
                        f" (at {path!r})."
                    )
                hooks.append(ModuleInputHook(kind, pattern, path, module, specs))
    return hooks


def holds_released_blocks(modules: Mapping[str, nn.Module]) -> bool:
    """Whether some of the modules are blocks that another pipeline stage runs (``runs_on_this_rank`` False): a
    pattern may then match nothing on this rank. Pipeline parallelism checks the plan on the whole model first."""
    return any(getattr(m, "runs_on_this_rank", True) is False for m in modules.values())


def install_module_input_hooks(hooks: list[ModuleInputHook], require_state: StateFn) -> list[RemovableHandle]:
    """Pre-hooks that cut or gather the arguments of every module in ``hooks`` at each of its calls."""
    handles = []
    for hook in hooks:
        handles.append(hook.module.register_forward_pre_hook(_pre_hook(hook, require_state), with_kwargs=True))
    return handles


def _pre_hook(hook: ModuleInputHook, require_state: StateFn):
    signature = inspect.signature(hook.module.forward)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state = require_state(hook.path)
        if hook.kind == "gather":  # (..., ceil(S/N), ...) -> (..., S, ...)
            return cut_arguments(signature, hook.specs, args, kwargs, state.gather, hook.path)

        # (..., S, ...) -> (..., ceil(S/N), ...); whole lengths for a Concat, a PrefixCount or a folded split
        return cut_arguments(signature, hook.specs, args, kwargs, state.split, hook.path, state.whole_length)

    return pre_hook
