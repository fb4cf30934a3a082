"""The DiT's weights outside its blocks, sharded over the pipeline stages between DiT calls.

Every stage runs the DiT's forward around its own blocks (embeddings, timestep and text embedders, the final
layer), so every stage needs the weights outside the blocks (the root) during a DiT call; between calls (the text
encode, the VAE decode, another component's work) none of them does. Each rank keeps rows ``[r * R, (r + 1) * R)``
of every root parameter (``R = ceil(rows / stages)``) as a DTensor ``Shard(0)`` over the stage group, so that lean
loading reads only those rows (``loading.deferred``), and the stages gather the whole parameters when the DiT is
called: all stages call it at the same time, with the same inputs (a pipeline's call pattern). The parameters stay
whole for the whole call (micro-batches or PipeFusion patches call the root once each: no collective there, so the
stages keep their own pace), and go back to their rows when it returns.

Memory: a rank holds ``1 / stages`` of the root between calls and the whole root during one (as without sharding),
since each parameter is gathered in place: a buffer of the whole parameter receives this rank's rows, then every
rank's slot is broadcast from that rank straight into it (an all-gather would need a second whole buffer on gloo),
and it becomes the parameter; the rows are copied out again when the call ends. A call of a root submodule outside
the DiT's forward (a pipeline that borrows one) gathers that submodule's parameters alone around its call.
Biases and norm scales (1-D), parameters with fewer rows than stages, and those the blocks also hold stay whole.
Bytes: each rank sends its rows to the other stages once per DiT call (the broadcasts wait for every stage to call the
DiT; they are not hidden).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from lightning_dit_parallel.parallel.incomplete import mark_incomplete, meta_like
from lightning_dit_parallel.parallel.rows import is_lean, own_rows, row_counts, row_range
from lightning_dit_parallel.plan import DiTPlan
from lightning_dit_parallel.utils.hooks import remove_handles


@dataclass
class _Entry:
    """One sharded root parameter: where it lives (every module slot, for tied parameters) and its sizes."""

    slots: list[tuple[nn.Module, str]]
    shape: torch.Size
    requires_grad: bool
    full: Tensor | None = None  # (stages * R, ...) while gathered
    holds: int = 0  # calls in progress that need it whole (the DiT's, a submodule's inside or outside it)

    @property
    def current(self) -> nn.Parameter:
        module, name = self.slots[0]
        return module._parameters[name]

    def put(self, param: nn.Parameter) -> None:
        for module, name in self.slots:
            module._parameters[name] = param


@dataclass
class RootShards:
    """Root parameters of one DiT sharded over the stage group (see the module docstring); ``remove()`` undoes it.

    Attributes:
        model: the DiT.
        mesh: the 1-D mesh of the stage group.
        entries: the sharded parameters.
    """

    model: nn.Module
    mesh: DeviceMesh
    entries: list[_Entry]
    handles: list[RemovableHandle] = field(default_factory=list)

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    def install(self) -> RootShards:
        for entry in self.entries:
            entry.put(own_rows(entry.current, self.mesh, entry.requires_grad))
        self.handles.append(self.model.register_forward_pre_hook(lambda m, args: self._gather(self.entries)))
        self.handles.append(
            self.model.register_forward_hook(lambda m, args, out: self._shard(self.entries), always_call=True)
        )
        owners: dict[int, tuple[nn.Module, list[_Entry]]] = {}
        for entry in self.entries:
            for module, _ in entry.slots:
                owners.setdefault(id(module), (module, []))[1].append(entry)
        for module, entries in owners.values():  # a root submodule called outside the DiT's forward
            if module is self.model:
                continue
            self.handles.append(module.register_forward_pre_hook(lambda m, args, e=entries: self._gather(e)))
            self.handles.append(
                module.register_forward_hook(lambda m, args, out, e=entries: self._shard(e), always_call=True)
            )
        return self

    def remove(self) -> None:
        """The whole parameters back on every rank (broadcasts over the stage group; every rank calls it), or, for
        a lean-loaded DiT, meta tensors of the whole shape, read again from the files by the next setup."""
        remove_handles(self.handles)
        if is_lean(self.model):
            self._to_meta()
            return
        try:
            for entry in self.entries:
                entry.holds = 0
            self._gather(self.entries)
        except BaseException:
            self.discard()
            raise
        for entry in self.entries:
            whole = entry.current
            if entry.full is not None and entry.full.shape[0] != entry.shape[0]:  # the padding rows of the last rank
                whole = nn.Parameter(whole.detach().clone(), requires_grad=entry.requires_grad)
            entry.put(whole)
            entry.full, entry.holds = None, 0

    def discard(self) -> None:
        """Undo without a collective (after a failed predict): the rows of other ranks are lost, the parameters become
        meta tensors and the model is marked incomplete (unless lean-loaded: read again at the next setup)."""
        remove_handles(self.handles)
        self._to_meta()
        if not is_lean(self.model):
            mark_incomplete(
                self.model,
                "the DiT's weights outside its blocks were sharded over the pipeline stages and a failure"
                " left no collective to gather them.",
            )

    def _to_meta(self) -> None:
        for entry in self.entries:
            entry.put(meta_like(entry.current))
            entry.full, entry.holds = None, 0

    @torch.no_grad()
    def _gather(self, entries: list[_Entry]) -> None:
        """The entries not whole yet made whole, in place (a collective over the stage group: every rank gathers the
        same entries at the same call)."""
        stages = self.mesh.size()
        works = []
        for entry in entries:
            entry.holds += 1
            if entry.full is not None:  # already whole (a submodule called inside the DiT's forward)
                continue
            local = entry.current.to_local()
            rows = row_counts(entry.shape[0], stages)[0]  # every rank's slot: the first (largest) rank's rows
            start, _ = row_range(entry.shape[0], self.mesh)
            full = torch.empty((stages * rows, *entry.shape[1:]), dtype=local.dtype, device=local.device)
            full[start : start + local.shape[0]].copy_(local)  # this rank's slot
            for source in range(stages):  # each rank's (rows, ...) slot from that rank, in place
                slot = full[source * rows : (source + 1) * rows]
                works.append(dist.broadcast(slot, group=self.group, group_src=source, async_op=True))
            entry.full = full
            entry.put(nn.Parameter(full[: entry.shape[0]], requires_grad=entry.requires_grad))  # rows dropped here
        for work in works:
            work.wait()

    def _shard(self, entries: list[_Entry]) -> None:
        """The entries no call needs whole any more back to this rank's rows (local work)."""
        for entry in entries:
            entry.holds = max(entry.holds - 1, 0)
            if entry.holds or entry.full is None:
                continue
            entry.put(own_rows(entry.current, self.mesh, entry.requires_grad))
            entry.full = None


def shards_rows(shape: tuple[int, ...], stages: int) -> bool:
    """Whether a root parameter of ``shape`` is kept by rows: weight matrices, kernels and tables (2 dims or more) with
    at least ``stages`` rows. Biases and norm scales stay whole: a few KB each, and a broadcast per stage and call."""
    return len(shape) >= 2 and shape[0] >= stages


def root_parameters(model: nn.Module, plan: DiTPlan, stages: int) -> list[_Entry]:
    """The parameters of ``model`` outside the plan's block lists that ``shards_rows`` keeps by rows, each once with
    every slot it fills (tied parameters), in module order; none that a block also holds."""
    in_blocks = {id(p) for _, blocks in plan.block_lists(model) for p in blocks.parameters()}
    entries: dict[int, _Entry] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or id(param) in in_blocks or isinstance(param, DTensor):
                continue
            if not shards_rows(tuple(param.shape), stages):
                continue
            if id(param) not in entries:
                entries[id(param)] = _Entry([], param.shape, param.requires_grad)
            entries[id(param)].slots.append((module, name))
    return list(entries.values())


def apply_root_shards(model: nn.Module, plan: DiTPlan, mesh: DeviceMesh) -> RootShards:
    """Shard ``model``'s weights outside its blocks over the 1-D stage ``mesh`` between DiT calls (see the module
    docstring); ``remove()`` undoes it. Local work only (no collective until the first call)."""
    return RootShards(model, mesh, root_parameters(model, plan, mesh.size())).install()
