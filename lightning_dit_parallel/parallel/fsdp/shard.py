"""FSDP inference: shard every transformer block's parameters with FSDP2, gather them just in time.

``fully_shard(block, reshard_after_forward=True)`` gives each rank 1/N of every block's parameters
(Shard(0) DTensors); a pre-forward hook all-gathers the block's parameters, a post-forward hook frees
them again. Between two uses a rank holds 1/N of each block plus the root's own parameters, also 1/N.

A model may call a block's submodule from outside the block's forward: diffusers' DiT computes its
final modulation with ``self.transformer_blocks[0].norm1.emb(...)`` after the block loop. Such a call
would meet sharded parameters, so every submodule of a unit gets a pre-hook that gathers the unit
(``unshard()``) when the unit is not running, and a hook that frees it again afterwards (see
``_OutsideCalls``). Every rank runs the same forward, so these collectives line up.

``fully_shard`` also swaps each unit's class for a subclass ``FSDP<Name>``; transformers models find the outputs they
record (``hidden_states``) by class, so the subclass is registered like the original (see ``encoders.py``).
A 0-dim parameter (CLIP's ``logit_scale``) has no dim to shard; it stays whole on every rank.

``apply_fsdp(..., offload=True)`` keeps the units' shards in host memory (FSDP2's ``CPUOffloadPolicy``, pinned on
CUDA): a unit's shard is copied to the device for its all-gather. Moving the module to the device leaves those shards
on the host (FSDP2's ``_apply`` puts a pinned shard back there); ``remove()`` brings each one to the mesh's device
just before its all-gather.

``remove()`` gives the plain module back: every sharded parameter is all-gathered once (a collective,
in the same order on every rank) and set back as an ordinary ``nn.Parameter``, FSDP's hooks and
per-module state are deleted and each module gets its own class back. FSDP2 has no public "unshard
for good" call, so the undo is by difference: what FSDP added to a module since ``apply`` is what
``remove`` takes away, including the entry that ``fully_shard`` makes for every unit in torch's
process-wide map of composable-API states (a module with an entry there cannot be sharded again).
Parallelizers are removed last-applied first, so no other parallelizer's hooks are in the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.distributed import _composable_state
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.loading.deferred import deferred_module_ids
from lightning_dit_parallel.parallel.fsdp.encoders import keep_output_recording
from lightning_dit_parallel.parallel.fsdp.gather_buffer import release_gather_buffers
from lightning_dit_parallel.parallel.fsdp.row_stream import RowStreamedLinear, apply_row_streaming
from lightning_dit_parallel.parallel.incomplete import mark_incomplete, meta_like
from lightning_dit_parallel.utils.hooks import WeightHooks, remove_handles
from lightning_dit_parallel.utils.layers import holder_counts, uncalled_layers

#: ``nn.Module`` attributes that hold hooks, keyed by hook id.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass
class _ModuleSnapshot:
    """A module's class, hook ids, instance attribute names and composable-API state before FSDP was applied."""

    cls: type
    hooks: dict[str, set]
    attributes: set[str]
    had_state: bool  # whether torch's composable-state map already had an entry for the module

    @classmethod
    def take(cls, module: nn.Module) -> _ModuleSnapshot:
        hooks = {name: set(getattr(module, name, {})) for name in _HOOK_DICTS}
        return cls(type(module), hooks, set(module.__dict__), module in _composable_state._module_state_mapping)

    def restore(self, module: nn.Module) -> None:
        """Drop the hooks, attributes and composable-API state added since the snapshot and give the module its
        class back."""
        if not self.had_state:
            # fully_shard registers every unit in a process-wide weak map; an entry left there makes the next
            # fully_shard of this module fail with "Inserting <module> more than once"
            _composable_state._module_state_mapping.pop(module, None)
        for name, before in self.hooks.items():
            hooks = getattr(module, name, None)
            if hooks is None:
                continue
            for key in [k for k in hooks if k not in before]:
                del hooks[key]
        for key in [k for k in module.__dict__ if k not in self.attributes]:
            del module.__dict__[key]
        module.__class__ = self.cls


class _OutsideCalls:
    """Gathers a unit's parameters around calls of its submodules made outside the unit's own forward.

    The root unit too: a pipeline may call an encoder's parts without its forward (``get_text_features``, or SD's
    ``text_encoder.text_model.final_layer_norm(...)`` for ``clip_skip``). FSDP makes the first unit whose forward runs
    the root of all units inside it, so before gathering, the root is set up as the root (its forward may not have
    run yet, and a unit inside the borrowed call must not take that place).
    """

    def __init__(self, unit: nn.Module, root: nn.Module) -> None:
        self.unit = unit
        self.root = root
        self.depth = 0  # >0 while the unit's parameters are gathered (its forward, or a borrowing call)
        self.borrowers: list[nn.Module] = []
        self.handles: list[RemovableHandle] = []

    def install(self, other_units: set[int]) -> None:
        """Hook the unit and its submodules, except those inside another (nested) unit, which gathers itself."""
        self.handles.append(self.unit.register_forward_pre_hook(self._enter, prepend=True))
        self.handles.append(self.unit.register_forward_hook(self._leave, always_call=True))
        for module in _modules_outside(self.unit, other_units):
            self.handles.append(module.register_forward_pre_hook(self._borrow, prepend=True))
            self.handles.append(module.register_forward_hook(self._give_back, always_call=True))

    def remove(self) -> None:
        remove_handles(self.handles)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.depth += 1

    def _leave(self, module: nn.Module, args: tuple, output) -> None:
        self.depth -= 1

    def _borrow(self, module: nn.Module, args: tuple) -> None:
        if self.depth == 0:
            self.root._get_fsdp_state()._lazy_init()  # no-op once the root's forward (or a borrow) has run
            self.unit.unshard()  # all-gather: (n/N, ...) per rank -> (n, ...)
            self.borrowers.append(module)
            self.depth += 1

    def _give_back(self, module: nn.Module, args: tuple, output) -> None:
        if self.borrowers and self.borrowers[-1] is module:
            self.borrowers.pop()
            self.depth -= 1
            self.unit.reshard()


@dataclass
class FSDPSharding:
    """FSDP2 installed on some modules of ``root``. ``remove()`` restores the plain, unsharded modules.

    Attributes:
        root: the module whose submodules (itself included) were sharded.
        units: the modules passed to ``fully_shard``, innermost first.
        mesh: the 1-D shard mesh.
    """

    root: nn.Module
    units: list[nn.Module]
    mesh: DeviceMesh
    snapshots: dict[int, tuple[nn.Module, _ModuleSnapshot]] = field(default_factory=dict)
    outside_calls: list[_OutsideCalls] = field(default_factory=list)
    release_hooks: list[RemovableHandle] = field(default_factory=list)
    streamed: list[RowStreamedLinear] = field(default_factory=list)

    def weight_hooks(self, module: nn.Module) -> list[WeightHooks]:
        """FSDP2's pre-forward hook (the all-gather) and post-forward hook (the free) of ``module`` when it is a unit
        other than the root: a caller that does not compute the unit may leave both out (step caching's skipped
        blocks, ``cache/weight_gate.py``). The root's hooks do more (lazy init, the forward's bookkeeping) and are
        never listed. ``[]`` where torch keeps them elsewhere: the unit is then gathered as usual."""
        if module is self.root or not any(u is module for u in self.units):
            return []
        state = module._get_fsdp_state()
        pre = getattr(state, "_pre_forward_hook_handle", None)
        post = getattr(state, "_post_forward_hook_handle", None)
        if not isinstance(pre, RemovableHandle) or not isinstance(post, RemovableHandle):
            return []
        return [WeightHooks(pre, post)]

    def remove(self) -> None:
        """All-gather every sharded parameter back into a plain ``nn.Parameter`` and undo ``fully_shard``.

        A collective over the shard mesh: every rank of it must call ``remove`` (teardown does).
        """
        self._remove_hooks()
        if not self.snapshots:
            return
        try:
            # one parameter at a time, gathered and moved to the host at once: never the whole model on a device
            self._replace_sharded(
                lambda p: nn.Parameter(
                    _on_mesh_device(p, self.mesh).full_tensor().detach().cpu(), requires_grad=p.requires_grad
                ),
                lean=deferred_module_ids(self.root),
            )
        except BaseException:
            self.discard()  # a peer is gone: the parameters not yet gathered become meta tensors
            raise
        self._restore_modules()

    def discard(self) -> None:
        """Undo ``fully_shard`` without a collective (after a failed predict, see ``incomplete.py``): every
        parameter still sharded becomes a meta tensor of its full shape, and ``root`` is marked incomplete."""
        self._remove_hooks()
        if not self.snapshots:
            return
        self._replace_sharded(meta_like)
        self._restore_modules()
        mark_incomplete(self.root, "its FSDP shards could not be gathered back (no collective after the failure).")

    def _remove_hooks(self) -> None:
        for hooks in self.outside_calls:
            hooks.remove()
        self.outside_calls.clear()
        remove_handles(self.release_hooks)
        for linear in self.streamed:
            linear.remove()
        self.streamed.clear()

    def _replace_sharded(self, whole, lean: set[int] = frozenset()) -> None:
        """Replace every sharded parameter by ``whole(parameter)`` (tied parameters stay tied); those of the
        ``lean`` modules (deferred weights, read again from their files at the next setup) by meta tensors, without a
        collective: the set is the same on every rank."""
        full: dict[int, nn.Parameter] = {}
        for module in self.root.modules():  # the same order on every rank
            for name, param in list(module._parameters.items()):
                if param is None or not hasattr(param, "full_tensor"):
                    continue
                if id(param) not in full:
                    # DTensor Shard(0): (ceil(n/N), ...) per rank -> all-gather -> (n, ...)
                    full[id(param)] = meta_like(param) if id(module) in lean else whole(param)
                module._parameters[name] = full[id(param)]

    def _restore_modules(self) -> None:
        for module, snapshot in self.snapshots.values():
            snapshot.restore(module)
        self.snapshots.clear()


def _all_ignored(unit: nn.Module, skip: set[int]) -> bool:
    """Whether ``unit`` has parameters and every one of them is in ``skip`` (ids)."""
    ids = {id(p) for p in unit.parameters()}
    return bool(ids) and ids <= skip


def apply_fsdp(
    root: nn.Module,
    units: list[nn.Module],
    mesh: DeviceMesh,
    *,
    offload: bool = False,
    rows: bool = False,
    ignored: Sequence[nn.Parameter] = (),
) -> FSDPSharding:
    """Shard ``units`` (innermost first; ``root`` last if it is one) with FSDP2 over ``mesh``.

    Every unit's parameters are sharded along dim 0 over the mesh and gathered around its forward only
    (``reshard_after_forward=True``). Parameters of ``root`` outside every unit stay as they are.

    With ``offload``, the shards of every unit but ``root`` (when ``root`` is a unit among others) live in host
    memory, pinned on CUDA (FSDP2's ``CPUOffloadPolicy``): each unit's shard is copied to the device for its
    all-gather and the gathered parameters are freed after its forward, so the device holds the root's shard and the
    running unit. The root's own shard (embeddings, final layers: small) stays on the device, where diffusers and
    transformers read a model's device from its first parameter. On a CPU mesh host and device are the same memory:
    the policy is applied (torch supports it with gloo) and moves nothing.

    Every unit's all-gather buffer is freed as soon as its parameters are copied out of it (``gather_buffer.py``). With
    ``rows``, every unit that is a plain ``nn.Linear`` (not ``root``) is never gathered: its forward takes each rank's
    rows in turn (``row_stream.py``).

    Args:
        root: the module that contains every unit (the snapshot for ``remove`` covers its submodules).
        units: modules to shard, each inner unit before any unit that contains it (e.g. a block's submodule
            that the model also calls outside the block, then the blocks, then the root).
        mesh: a 1-D device mesh (see ``shard_mesh``).
        offload: keep the units' shards in (pinned) host memory between uses.
        rows: compute the Linear units one rank's rows at a time instead of gathering them.
        ignored: parameters FSDP leaves as they are (another parallelizer splits them: ``vocab_rows.py``); a unit
            whose parameters are all ignored is no unit.

    Raises:
        ValueError: for a unit that is not inside ``root`` or is listed twice, or a mesh that is not 1-D.
    """
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp needs a 1-D shard mesh; got {mesh.ndim} dims ({mesh}).")
    inside = {id(m) for m in root.modules()}
    outside = [type(u).__name__ for u in units if id(u) not in inside]
    if outside:
        raise ValueError(f"FSDP units {outside} are not submodules of {type(root).__name__}.")
    if len({id(u) for u in units}) != len(units):
        raise ValueError(f"FSDP units must be distinct; got {[type(u).__name__ for u in units]}.")
    skip = {id(p) for p in ignored}
    units = [u for u in units if u is root or not _all_ignored(u, skip)]  # such a unit is none
    sharding = FSDPSharding(root, list(units), mesh)
    sharding.snapshots = {id(m): (m, _ModuleSnapshot.take(m)) for m in root.modules()}
    try:
        for unit in units:
            # a 0-dim parameter (CLIP's logit_scale) has no dim to shard: it stays whole on every rank
            left = [p for p in unit.parameters() if p.ndim == 0 or id(p) in skip]
            policy = offload_policy(mesh) if offload and (unit is not root or len(units) == 1) else OffloadPolicy()
            fully_shard(
                unit,
                mesh=mesh,
                reshard_after_forward=True,
                offload_policy=policy,
                **({"ignored_params": set(left)} if left else {}),
            )
            sharding.release_hooks.append(release_gather_buffers(unit))  # one gathered copy of a unit, not three
        # transformers looks up the outputs a model records by its class: the FSDP subclass gets the original's
        keep_output_recording((u, sharding.snapshots[id(u)][1].cls) for u in units)
        root_is_unit = any(u is root for u in units)
        for unit in units:
            sharding.outside_calls.append(_OutsideCalls(unit, root if root_is_unit else _outermost(unit, units)))
            sharding.outside_calls[-1].install({id(u) for u in units if u is not unit})
        if rows:
            sharding.streamed = apply_row_streaming(units, mesh.get_group(), sharding.weight_hooks)
    except BaseException:
        sharding.remove()
        raise
    return sharding


def offload_policy(mesh: DeviceMesh) -> CPUOffloadPolicy:
    """FSDP2's host offload for a unit on ``mesh``: shards in host memory, pinned where the device is CUDA (pinned
    pages make the host-to-device copies asynchronous; a CPU mesh has no device copy to speed up)."""
    return CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")


def _on_mesh_device(param: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``param`` with its local shard on the mesh's device: a shard offloaded to host memory goes to the device for
    the all-gather of ``remove`` (NCCL gathers device tensors only); one parameter at a time."""
    if mesh.device_type == "cpu" or param.device.type == mesh.device_type:
        return param
    return param.to(torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device()))


def _outermost(unit: nn.Module, units: list[nn.Module]) -> nn.Module:
    """The outermost of ``units`` (innermost first) that contains ``unit``: FSDP's root for it."""
    return next(u for u in reversed(units) if any(m is unit for m in u.modules()))


def _modules_outside(unit: nn.Module, other_units: set[int]) -> list[nn.Module]:
    """Submodules of ``unit`` (not ``unit`` itself) that are not inside one of ``other_units`` and hold parameters of
    the unit (themselves or below, outside the other units); a parameterless one (rotary embedding, dropout) needs no
    gather."""
    found: list[tuple[nn.Module, bool]] = []

    def walk(parent: nn.Module) -> bool:  # whether parent holds a parameter of the unit
        holds = any(p is not None for p in parent._parameters.values())
        for child in parent.children():
            if id(child) not in other_units:
                found.append((child, False))
                index = len(found) - 1
                found[index] = (child, walk(child))
                holds = holds or found[index][1]
        return holds

    walk(unit)
    return [module for module, holds in found if holds]


def block_units(blocks: list[tuple[str, nn.ModuleList]]) -> list[nn.Module]:
    """Each block of the plan's block lists, in execution order.

    Read with ``children()``, not by iterating the list: a pipeline stage changes what iteration yields.
    """
    return [block for _, block_list in blocks for block in block_list.children()]


def module_units(module: nn.Module) -> list[nn.Module]:
    """FSDP units for a module without a plan (e.g. a text encoder): the elements of the outermost
    ``nn.ModuleList``s inside it (its layers), then the module itself."""
    units: list[nn.Module] = []

    def collect(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, nn.ModuleList):
                units.extend(child)
            else:
                collect(child)

    if isinstance(module, nn.ModuleList):
        units.extend(module)
    else:
        collect(module)
    return [*units, module]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP-sharded parameter)."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


#: What one FSDP unit of a DiT is: each transformer block, or each weight layer (see ``weight_layers``); ``"rows"``:
#: the weight layers' units, the Linears among them never gathered whole (``row_stream.py``); ``"auto"``: ``"rows"``,
#: or ``"layers"`` with tensor parallelism (``resolve_fsdp_units``).
FsdpUnits = Literal["auto", "blocks", "layers", "rows"]

#: Modules that hold a layer's weight matrix (or kernel, or table): the units of ``fsdp_units="layers"``.
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def check_fsdp_units(fsdp_units: str) -> None:
    """Raise ``ValueError`` unless ``fsdp_units`` is ``"auto"``, ``"blocks"``, ``"layers"`` or ``"rows"``."""
    if fsdp_units not in ("auto", "blocks", "layers", "rows"):
        raise ValueError(f"fsdp_units must be 'auto', 'blocks', 'layers' or 'rows'; got {fsdp_units!r}.")


def resolve_fsdp_units(fsdp_units: str, tp: int) -> str:
    """``"auto"`` -> ``"rows"`` (the lowest peak: no Linear is ever gathered whole), or ``"layers"`` where tensor
    parallelism (``tp > 1``) already splits the blocks' Linears; any other value as it is.

    Raises:
        ValueError: for ``"rows"`` with ``tp > 1`` (rows streaming computes a Linear from the FSDP shards of its rows,
            which tensor parallelism has already split).
    """
    check_fsdp_units(fsdp_units)
    if fsdp_units == "rows" and tp > 1:
        raise ValueError(
            "fsdp_units='rows' computes each Linear from the FSDP shards of its rows; tensor parallelism (tp > 1)"
            " already splits those Linears: use fsdp_units='layers' (or 'auto') with tp."
        )
    if fsdp_units != "auto":
        return fsdp_units
    return "layers" if tp > 1 else "rows"


def weight_layers(root: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """The weight layers (``WEIGHT_LAYERS`` with parameters) of ``root`` that are not units already, innermost units
    for ``apply_fsdp`` ahead of ``units``: a rank then gathers one layer at a time (a few MB to a few hundred MB)
    instead of a whole block; norms, biases of other modules and a block's own parameters stay in the block's unit,
    the root's in the root's. Layers whose parent reads their weights without calling them
    (``utils.layers.UNCALLED_LAYERS``: torch's ``nn.MultiheadAttention`` and its ``out_proj``, e.g. SigLIP's pooling
    head) stay with the parent."""
    taken = {id(u) for u in units}
    uncalled = uncalled_layers(root)
    return [
        m
        for m in root.modules()
        if isinstance(m, WEIGHT_LAYERS)
        and id(m) not in taken
        and id(m) not in uncalled
        and m is not root
        and any(True for _ in m.parameters())
    ]


def encoder_units(module: nn.Module) -> list[nn.Module]:
    """FSDP units of a module without a plan (a text or image encoder): each of its weight layers (``WEIGHT_LAYERS``)
    whose parameters no other module holds, then ``module_units`` (its layers, then the module itself).

    A rank then gathers one weight matrix at a time while the encoder runs, not a whole layer (with gloo on CPU FSDP2
    holds about 3x the unit gathered on top of the shards). An encoder runs once per batch, so the extra, smaller
    all-gathers cost little next to the denoising steps. A tied weight (T5's ``shared`` and
    ``encoder.embed_tokens``: one parameter in two modules) cannot be in two units: such layers stay in the unit
    above them.
    """
    units = module_units(module)
    holders = holder_counts(module)
    layers = [m for m in weight_layers(module, units) if all(holders[id(p)] == 1 for p in m.parameters())]
    return [*layers, *units]
