"""Host offload without FSDP: a unit's weights live in (pinned) host memory and are copied to the device around its
forward only.

For the layouts where FSDP2's ``CPUOffloadPolicy`` does not apply (pipeline stages, tensor parallelism, encoders kept
whole, sequence or data parallelism alone), ``apply_offload(root, units)`` keeps the parameters of each unit (a
transformer block of the plan's block lists, a plan's shared module, an encoder layer) on the host:

* a forward pre-hook copies the unit's parameters to the device of the unit's inputs (the hidden states), a forward
  hook (also on error) puts the host tensors back, so the device holds the running unit only and its copy is freed
  as soon as the unit returns. ``param.data`` is swapped (the local tensor of a DTensor parameter), so the
  ``nn.Parameter`` objects, tied weights and every hook of other parallelizers stay as they are;
* a submodule of a unit called outside the unit's forward (a borrowed call, as diffusers' DiT makes with
  ``transformer_blocks[0].norm1.emb``) loads the unit around that call, as FSDP's outside-call hooks gather it;
* moving the module to the device (``model_to_device``, ``module.to(...)``; also the lean loader's ``materialize``)
  leaves the units' parameters on the host: each unit's ``_apply`` converts their dtype as asked but keeps them in
  host memory, pinned when the target is CUDA (asynchronous host-to-device copies).

The root's own parameters (embeddings, final layers) and the buffers go to the device as usual: diffusers and
transformers read a model's device from its first parameter. A parameter shared by two units or by a unit and the
root is not offloaded. Where inputs and parameters are already on the same device (CPU) the hooks move nothing: the
forward is the plain one.

``remove()`` takes the hooks and the ``_apply`` overrides away (no collective). The parameters stay in host memory,
except with ``to_device_on_remove`` (pipeline stages and tensor parallelism on an accelerator): their own removal
broadcasts / all-gathers the parameters with collectives that need device tensors, so they go back to the device
first, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.utils.hooks import WeightHooks, remove_handles

#: Where offloaded weights live.
HOST = torch.device("cpu")


@dataclass
class _Unit:
    """One streamed unit: its module, the ``(owner, name)`` slots of the parameters it offloads and what is on the
    device while it runs."""

    module: nn.Module
    slots: list[tuple[nn.Module, str]]
    depth: int = 0  # > 0 while its parameters are on the device (its forward or a borrowed call)
    borrowers: list[nn.Module] = field(default_factory=list)
    saved: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # (parameter, host tensor)
    hooks: WeightHooks | None = None  # the load / unload hooks on the unit itself

    def parameters(self) -> list[nn.Parameter]:
        """The unit's offloaded parameters, each once (tied slots share one)."""
        seen: dict[int, nn.Parameter] = {}
        for owner, name in self.slots:
            param = owner._parameters.get(name)
            if param is not None:
                seen.setdefault(id(param), param)
        return list(seen.values())

    def load(self, device: torch.device | None) -> None:
        """Copy the parameters that are not on ``device`` there (asynchronously from pinned memory)."""
        if device is None:
            return
        for param in self.parameters():
            host = _data(param)
            if host.device != device and not host.is_meta:
                self.saved.append((param, host))
                _set_data(param, host.to(device, non_blocking=True))

    def unload(self) -> None:
        """Give the parameters their host tensors back (the device copies are freed)."""
        while self.saved:
            param, host = self.saved.pop()
            _set_data(param, host)


@dataclass
class Offloaded:
    """Host offload installed on the units of ``root``; ``remove()`` undoes it.

    Attributes:
        root: the module whose units are offloaded (a DiT, an encoder).
        units: the streamed units, innermost first.
        device: the device the module was last moved to (the execution device); ``None`` before.
        to_device_on_remove: ``remove`` puts the parameters on ``device`` (see the module docstring).
    """

    root: nn.Module
    units: list[_Unit]
    to_device_on_remove: bool = False
    device: torch.device | None = None
    handles: list[RemovableHandle] = field(default_factory=list)
    overridden: list[nn.Module] = field(default_factory=list)  # modules whose ``_apply`` is ours

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the parameters kept in host memory (local shards of DTensors)."""
        return sum(_data(p).numel() * _data(p).element_size() for u in self.units for p in u.parameters())

    def weight_hooks(self, module: nn.Module) -> list[WeightHooks]:
        """The load and unload hooks of ``module`` when it is a streamed unit: a caller that does not compute the unit
        may leave both out (step caching's skipped blocks, ``cache/weight_gate.py``)."""
        return [u.hooks for u in self.units if u.module is module and u.hooks is not None]

    def remove(self) -> None:
        """Remove the hooks and the ``_apply`` overrides; the parameters stay on the host unless
        ``to_device_on_remove``. No collective."""
        remove_handles(self.handles)
        for unit in self.units:
            unit.unload()
            unit.depth = 0
            unit.borrowers.clear()
        for module in self.overridden:
            module.__dict__.pop("_apply", None)
        self.overridden.clear()
        if self.to_device_on_remove and self.device is not None:
            for unit in self.units:
                for param in unit.parameters():
                    if not _data(param).is_meta:
                        _set_data(param, _data(param).to(self.device))
        self.units.clear()

    # -- hooks -------------------------------------------------------------------------------------------------

    def _install(self, unit: _Unit, nested: set[int]) -> None:
        module = unit.module
        self.handles.append(
            module.register_forward_pre_hook(
                lambda m, args, kwargs: self._enter(unit, args, kwargs), with_kwargs=True, prepend=True
            )
        )
        self.handles.append(module.register_forward_hook(lambda m, args, output: self._leave(unit), always_call=True))
        unit.hooks = WeightHooks(self.handles[-2], self.handles[-1])
        for sub in _modules_outside(module, nested):
            self.handles.append(
                sub.register_forward_pre_hook(
                    lambda m, args, kwargs: self._borrow(unit, m, args, kwargs), with_kwargs=True, prepend=True
                )
            )
            self.handles.append(
                sub.register_forward_hook(lambda m, args, output: self._give_back(unit, m), always_call=True)
            )

    def _enter(self, unit: _Unit, args: tuple, kwargs: dict) -> None:
        if unit.depth == 0:
            unit.load(_input_device(args, kwargs) or self.device)
        unit.depth += 1

    def _leave(self, unit: _Unit) -> None:
        unit.depth -= 1
        if unit.depth == 0:
            unit.unload()

    def _borrow(self, unit: _Unit, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if unit.depth == 0:
            unit.load(_input_device(args, kwargs) or self.device)
            unit.borrowers.append(module)
            unit.depth += 1

    def _give_back(self, unit: _Unit, module: nn.Module) -> None:
        if unit.borrowers and unit.borrowers[-1] is module:
            unit.borrowers.pop()
            self._leave(unit)

    # -- keeping the parameters on the host when the module moves ---------------------------------------------

    def _override_apply(self, module: nn.Module) -> None:
        """``module._apply(fn)`` (what ``.to()``, ``.cuda()`` ... call) applies ``fn`` to everything but the
        offloaded parameters, which get its dtype and stay in host memory."""

        def _apply(fn, *args, **kwargs):
            offloaded = {id(p) for u in self.units for p in u.parameters()}
            return type(module)._apply(
                module, lambda t: self._host_version(t, fn) if id(t) in offloaded else fn(t), *args, **kwargs
            )

        module.__dict__["_apply"] = _apply
        self.overridden.append(module)

    def _host_version(self, t: torch.Tensor, fn) -> torch.Tensor:
        """What ``fn`` makes of ``t``, kept on the host when ``fn`` moves tensors to an accelerator."""
        local = _local(t)
        target = fn(torch.empty(0, dtype=t.dtype, device=local.device))  # where and as what fn puts a tensor
        if target.device.type in ("cpu", "meta"):
            return fn(t)  # host to host (a dtype, .cpu()), or to the meta device: as asked
        self.device = target.device
        return _to_host(t, target.dtype, pin=target.device.type == "cuda")


def apply_offload(root: nn.Module, units: list[nn.Module], *, to_device_on_remove: bool = False) -> Offloaded:
    """Keep the parameters of ``units`` (submodules of ``root``, innermost first) in host memory and stream each unit
    to the device around its forward.

    Args:
        root: the module that contains every unit.
        units: modules streamed one at a time (a unit inside another is streamed on its own: its parameters are not
            the outer unit's).
        to_device_on_remove: ``remove()`` moves the parameters back to the device the module was moved to.

    Raises:
        ValueError: for a unit that is not inside ``root``, one listed twice, or no units.
    """
    if not units:
        raise ValueError(f"apply_offload needs at least one unit of {type(root).__name__} to offload.")
    inside = {id(m) for m in root.modules()}
    outside = [type(u).__name__ for u in units if id(u) not in inside]
    if outside:
        raise ValueError(f"Offload units {outside} are not submodules of {type(root).__name__}.")
    if len({id(u) for u in units}) != len(units):
        raise ValueError(f"Offload units must be distinct; got {[type(u).__name__ for u in units]}.")
    unit_ids = {id(u) for u in units}
    slots = {id(u): _own_slots(u, unit_ids - {id(u)}) for u in units}
    # a parameter used outside its unit (the root, another unit) must be on the device whenever that code runs
    owners: dict[int, int] = {}
    for u in units:
        for pid in {id(owner._parameters[name]) for owner, name in slots[id(u)]}:
            owners[pid] = owners.get(pid, 0) + 1
    elsewhere = {id(p) for _, p in _own_slots_params(root, unit_ids)}
    offloaded = Offloaded(root, [], to_device_on_remove=to_device_on_remove)
    for u in units:
        kept = [
            (owner, name)
            for owner, name in slots[id(u)]
            if owners[id(owner._parameters[name])] == 1 and id(owner._parameters[name]) not in elsewhere
        ]
        offloaded.units.append(_Unit(u, kept))
    try:
        for unit in offloaded.units:
            offloaded._install(unit, unit_ids - {id(unit.module)})
            offloaded._override_apply(unit.module)
    except BaseException:
        offloaded.remove()
        raise
    return offloaded


def _own_slots(unit: nn.Module, nested: set[int]) -> list[tuple[nn.Module, str]]:
    """``(owner, name)`` of every parameter slot of ``unit`` outside the ``nested`` units."""
    return [(owner, name) for owner, name, _ in _walk(unit, nested)]


def _own_slots_params(root: nn.Module, units: set[int]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter of ``root`` outside all ``units`` (``root`` itself is not one)."""
    return [(name, param) for _, name, param in _walk(root, units - {id(root)})]


def _walk(module: nn.Module, skip: set[int]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    found = [(module, name, p) for name, p in module._parameters.items() if p is not None]
    for child in module.children():
        if id(child) not in skip:
            found += _walk(child, skip)
    return found


def _modules_outside(unit: nn.Module, nested: set[int]) -> list[nn.Module]:
    """Submodules of ``unit`` (not ``unit`` itself) outside the ``nested`` units that hold parameters of the unit
    (themselves or below): the ones a call from outside the unit's forward needs loaded."""
    found = []
    for child in unit.children():
        if id(child) in nested:
            continue
        if _walk(child, nested):
            found.append(child)
        found += _modules_outside(child, nested)
    return found


def _input_device(args: tuple, kwargs: dict) -> torch.device | None:
    """The device of the first tensor among the call's arguments (one level into tuples and lists)."""
    for value in _values(args, kwargs):
        if isinstance(value, torch.Tensor):
            return _local(value).device
    for value in _values(args, kwargs):
        if isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return _local(item).device
    return None


def _values(args: tuple, kwargs: dict) -> Iterable:
    yield from args
    yield from kwargs.values()


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "_local_tensor") and hasattr(t, "placements")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if _is_dtensor(t) else t


def _data(param: nn.Parameter) -> torch.Tensor:
    """The storage the hooks move: the local tensor of a DTensor parameter, else ``param.data``."""
    return param._local_tensor if _is_dtensor(param) else param.data


def _set_data(param: nn.Parameter, value: torch.Tensor) -> None:
    if _is_dtensor(param):
        param._local_tensor = value
    else:
        param.data = value


def _to_host(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``t`` as ``dtype`` in host memory (pinned with ``pin``); a meta tensor gets empty host storage (the lean loader
    reads into it)."""
    if _is_dtensor(t):
        if t.dtype != dtype:
            t = t.to(dtype=dtype)  # the local tensor stays where it is
        local = _local(t)
        moved = _to_host(local, dtype, pin)
        if moved is not local:
            t._local_tensor = moved
        return t
    out = torch.empty_like(t, device=HOST, dtype=dtype) if t.is_meta else t.to(device=HOST, dtype=dtype)
    if pin and not out.is_pinned():
        out = out.pin_memory()
    return out
