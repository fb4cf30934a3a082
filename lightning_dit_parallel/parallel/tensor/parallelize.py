"""Install tensor parallelism on a DiT with torch's DTensor API, one planned block at a time; ``remove()`` undoes it.

For every block a rank holds (a pipeline stage: the blocks it kept), one
``parallelize_module(block, tp_mesh, {relative path: style})`` with the layout's styles (``styles.py``): column-wise
projections keep ``out/N`` rows of their weight as a ``Shard(0)`` DTensor and return their output split over the
last dim; row-wise ones keep ``in/N`` columns (``Shard(1)``) and all-reduce their partial outputs
(``Partial`` -> ``Replicate``). Per block that is two all-reduces of the hidden states, attention output and MLP
down projection (four for a two-stream block). The attention modules whose projections are split get their local
head counts (``heads.py``) so that diffusers' processors reshape into the rank's own heads, and the modules whose
output holds values for all heads (``DiTPlan.tensor_parallel_outputs``, e.g. LTX's rotary tables) get a forward hook
that keeps this rank's heads' part (``features.py``). The Linears of the DiT's root (embedders, output projection;
``resolve.root_linears``) keep ``out/N`` rows and all-gather their output, so no rank holds the root whole. peft
LoRA layers arrive expanded into their base layer and adapter factors (``lora.py``), each an ``nn.Linear`` with a
plain style.

``remove()`` gives the plain module back (the output hooks removed): every parameter a style replaced is gathered
into an ordinary ``nn.Parameter`` (a collective over the tp group, in the same order on every rank; a parameter FSDP's
removal has already gathered is taken as it is), packed parts put back in model order, the hooks and attributes that
``parallelize_module`` added are deleted and the head counts restored. FSDP on top is removed first
(parallelizers are removed last-applied first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from lightning_dit_parallel.loading.deferred import DEFERRED_ATTR, deferred_module_ids
from lightning_dit_parallel.parallel.incomplete import mark_incomplete, meta_like
from lightning_dit_parallel.parallel.tensor.features import install_output_cuts
from lightning_dit_parallel.parallel.tensor.heads import local_head_attributes
from lightning_dit_parallel.parallel.tensor.resolve import TensorParallelLayout, block_of
from lightning_dit_parallel.parallel.tensor.styles import Spec, packed_sizes, torch_style, unpack
from lightning_dit_parallel.plan import Packed
from lightning_dit_parallel.utils.hooks import remove_handles
from lightning_dit_parallel.utils.memory import local_tensor

#: ``nn.Module`` attributes holding the forward hooks that ``parallelize_module`` registers, keyed by hook id.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@dataclass
class _Target:
    """One module a style was applied to, with what it had before (to take away what the style added)."""

    module: nn.Module
    path: str
    packed: dict[str, tuple[int, tuple[int, ...]]]  # parameter -> (split dim, part sizes) for packed styles
    hooks: dict[str, set]
    attributes: set[str]

    @classmethod
    def take(cls, module: nn.Module, path: str, spec: Spec) -> _Target:
        packed: dict[str, tuple[int, tuple[int, ...]]] = {}
        if isinstance(spec, Packed):
            sizes = packed_sizes(spec, module, path)
            names = ("weight", "bias") if spec.style == "colwise" else ("weight",)  # a row-wise bias stays whole
            dim = 0 if spec.style == "colwise" else 1
            packed = {n: (dim, sizes) for n in names if getattr(module, n, None) is not None}
        hooks = {name: set(getattr(module, name, {})) for name in _HOOK_DICTS}
        return cls(module, path, packed, hooks, set(module.__dict__))

    def restore(self, tp: int, gather: bool = True) -> None:
        """Give the module its plain parameters back; ``gather=False`` (no collective): a sharded or packed one
        becomes a meta tensor of its full shape."""
        for name, param in list(self.module._parameters.items()):
            if param is None:
                continue
            if not gather:
                if hasattr(param, "full_tensor") or name in self.packed:
                    self.module._parameters[name] = meta_like(param)
                continue
            full = _full(param).cpu()  # one tensor at a time onto the host: never the whole model on a device
            if name in self.packed:
                dim, sizes = self.packed[name]
                full = unpack(full, dim, sizes, tp)  # ranks' shards in rank order -> parts in model order
            self.module._parameters[name] = nn.Parameter(full.detach(), requires_grad=param.requires_grad)
        for name, before in self.hooks.items():
            hooks = getattr(self.module, name, {})
            for key in [k for k in hooks if k not in before]:
                del hooks[key]
        for key in [k for k in self.module.__dict__ if k not in self.attributes]:
            del self.module.__dict__[key]  # _distribute_module_applied, a sharded norm's forward


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered over its mesh (a collective), a plain tensor is already whole."""
    if not hasattr(param, "full_tensor"):
        return param
    if local_tensor(param).is_meta:
        return torch.empty(param.shape, dtype=param.dtype, device="meta")
    return param.full_tensor()


@dataclass
class TensorParallel:
    """Tensor parallelism installed on one DiT. Call ``remove()`` (on every rank of the tp group) to undo it."""

    model: nn.Module
    mesh: DeviceMesh
    layout: TensorParallelLayout
    targets: list[_Target] = field(default_factory=list)
    heads: list[tuple[nn.Module, dict[str, tuple[int, int]]]] = field(default_factory=list)
    handles: list = field(default_factory=list)  # forward hooks cutting per-head outputs (features.py)

    def remove(self) -> None:
        remove_handles(self.handles)
        for module, attributes in self.heads:
            for name, (whole, _) in attributes.items():
                setattr(module, name, whole)
        self.heads.clear()
        lean = deferred_module_ids(self.model)  # deferred weights: read again at the next setup, never gathered
        try:
            while self.targets:  # the same order on every rank: the gathers line up
                self.targets[0].restore(self.mesh.size(), gather=id(self.targets[0].module) not in lean)
                self.targets.pop(0)
        except BaseException:
            self.discard()  # a peer is gone: the parameters not yet gathered become meta tensors
            raise

    def discard(self) -> None:
        """Undo tensor parallelism without a collective (after a failed predict, see ``incomplete.py``): sharded
        parameters become meta tensors of their full shape and the model is marked incomplete."""
        remove_handles(self.handles)
        for module, attributes in self.heads:
            for name, (whole, _) in attributes.items():
                setattr(module, name, whole)
        self.heads.clear()
        if not self.targets:
            return
        for target in self.targets:
            target.restore(self.mesh.size(), gather=False)
        self.targets.clear()
        mark_incomplete(
            self.model, "its tensor-parallel shards could not be gathered back (no collective after the failure)."
        )


def apply_tensor_parallel(model: nn.Module, layout: TensorParallelLayout, mesh: DeviceMesh) -> TensorParallel:
    """Shard the modules of ``layout`` (see ``resolve.resolve_layout``) over the 1-D ``mesh``, block by block.

    Modules of blocks this rank does not hold (released by a pipeline stage) are skipped. The root's Linears
    (``layout.root``) whose output features the tp degree divides are split too, their outputs all-gathered.
    """
    if mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs the 1-D tp mesh; got {mesh.ndim} dims ({mesh}).")
    modules = dict(model.named_modules())
    present = {path: spec for path, spec in layout.styles.items() if path in modules}
    installed = TensorParallel(model, mesh, layout)
    try:
        for block in layout.blocks:
            entries = {path: spec for path, spec in present.items() if block_of(path, (block,)) is not None}
            if not entries:
                continue
            relative = {}
            for path, spec in entries.items():
                installed.targets.append(_Target.take(modules[path], path, spec))
                relative[path[len(block) + 1 :]] = torch_style(spec, modules[path], path)
            parallelize_module(modules[block], mesh, relative, src_data_rank=None)
        root = {path: spec for path, spec in layout.root.items() if modules[path].out_features % mesh.size() == 0}
        for path, spec in root.items():  # the root's Linears: out/N rows each, outputs all-gathered
            installed.targets.append(_Target.take(modules[path], path, spec))
        if root:
            parallelize_module(
                model,
                mesh,
                {path: torch_style(spec, modules[path], path) for path, spec in root.items()},
                src_data_rank=None,
            )
        for path in layout.attention:
            if path in modules:
                attributes = local_head_attributes(modules[path], mesh.size())
                installed.heads.append((modules[path], attributes))
                for name, (_, local) in attributes.items():
                    setattr(modules[path], name, local)
        present_outputs = {path: spec for path, spec in layout.outputs.items() if path in modules}
        installed.handles.extend(
            install_output_cuts(modules, present_outputs, mesh.get_local_rank(), mesh.size(), type(model).__name__)
        )
    except BaseException:
        installed.remove()
        raise
    return installed


def check_deferred_packed(root: nn.Module, dits: list[tuple[nn.Module, TensorParallelLayout]]) -> None:
    """Deferred loading (``loading.defer_weights``) reads each rank's region of a DTensor from its placement; a packed
    shard (parts of a fused Linear) is not such a region, so packed styles need the weights loaded before.

    Raises:
        ValueError: when ``root`` has deferred weights and a packed style would shard parameters still on meta.
    """
    if not any(DEFERRED_ATTR in m.__dict__ for m in root.modules()):
        return
    for dit, layout in dits:
        modules = dict(dit.named_modules())
        lazy = [
            p
            for p, s in layout.styles.items()
            if isinstance(s, Packed) and p in modules and any(t.is_meta for t in modules[p].parameters())
        ]
        if lazy:
            raise ValueError(
                f"{type(dit).__name__}: packed tensor-parallel styles on deferred weights ({lazy[:3]}): their shards"
                " are not one region of each tensor, which deferred loading reads. Load the weights before"
                " parallelizing, or declare a layout without Packed styles (DiTPlan.tensor_parallel)."
            )
